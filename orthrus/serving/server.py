"""The OpenAI-compatible server: FastAPI on the event loop, the engine on one thread.

Engine methods are not thread-safe, so exactly one thread (EngineLoop) calls add/step/abort.
Handlers validate a request, wrap it in a Job and post it to the loop's inbox; between cycles the
loop applies posted adds and aborts (so requests join and leave at cycle boundaries), runs one
cycle over every running row, and sends each job its new text through the event loop
(`call_soon_threadsafe` into the job's asyncio.Queue). A job that stops being listened to (client
gone, timeout) is aborted, which frees its row for the next cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Orthrus, TextStream
from ..engine import Engine, Mode, Sequence, extension_accepted
from ..errors import OrthrusError
from ..sampling import SamplingParams
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, ResponseBuilder, SamplingRequest, Usage

log = logging.getLogger("orthrus.serving")


@dataclass
class ServerConfig:
    max_batch: int = 8  # batch rows: requests decoded together
    max_queue: int = 64  # requests waiting for a row; beyond that, 503
    max_model_len: int | None = None  # prompt + generated tokens; None: min(2048, the model's positions)
    request_timeout: float = 600.0  # seconds from arrival to the last token
    api_key: str | None = None  # bearer token required on /v1/* when set
    model_name: str | None = None  # the id clients ask for; None: the loaded model's name
    mode: Mode = "orthrus"  # or "ar": plain decoding, the baseline
    draft_confidence: float = 0.0  # verify drafts only up to the first unsure one (0: all)
    max_request_bytes: int = 4 * 2**20  # a larger body gets 413 before it is read

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 0:
            raise OrthrusError(f"max batch must be >= 1 and max queue >= 0, got {self.max_batch} and {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise OrthrusError(f"max model length must be >= 2 tokens, got {self.max_model_len}")
        if not self.request_timeout > 0:
            raise OrthrusError(f"request timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_request_bytes < 1024:
            raise OrthrusError(f"max request size must be >= 1024 bytes, got {self.max_request_bytes}")


MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass
class Event:
    """What a job hears after a cycle; the last one has a finish_reason (and usage, or an error)."""

    text: str = ""
    finish_reason: str | None = None  # stop | length, or error | timeout with `error` set
    usage: Usage | None = None
    error: APIError | None = None


class Job:
    """One admitted request: its engine sequence and text stream (engine thread), its event queue
    and bookkeeping (event loop)."""

    def __init__(self, seq: Sequence, text: TextStream, arrived: float, deadline: float):
        self.seq, self.text, self.arrived, self.deadline = seq, text, arrived, deadline
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.last_output: float | None = None  # engine thread: when the previous tokens came out
        self.engine_done = False  # the engine finished it (stop, length, error): nothing to abort
        self.outcome: str | None = None  # for the requests_total metric; None when the client left
        self.released = False

    def send(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineLoop:
    """The engine's thread: the only caller of Engine.add/step/abort."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue[tuple[str, Job | None]] = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}  # sequence id -> job, while the engine holds it
        self.thread = threading.Thread(target=self._run, name="orthrus-engine", daemon=True)
        self.dead = False
        self.on_death = lambda: None  # `orthrus serve` sets it: end the process, non-zero, for a supervisor to restart

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(("stop", None))
        self.thread.join()

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    def _run(self) -> None:
        try:
            while self._apply_inbox():
                if self.engine.has_work():
                    self._step()
                self.metrics.set("orthrus:kv_cache_usage_perc", self.engine.kv_cache_usage)
                self.metrics.set("orthrus:num_requests_running", len(self.engine.running))
                self.metrics.set("orthrus:num_requests_waiting", len(self.engine.waiting))
        except BaseException:  # the loop itself broke: say so at once, fail every request, and let the process exit
            log.critical("the engine loop died; failing every request and shutting down", exc_info=True)
            self.dead = True
            try:
                self._fail_all(APIError(503, "the engine stopped", "server_error"))
            finally:
                self.on_death()

    def _apply_inbox(self) -> bool:
        """Apply every posted add and abort, waiting for one when there is nothing to decode.
        False when asked to stop."""
        block = not self.engine.has_work()
        while True:
            try:
                kind, job = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "end_all":  # shutdown after the grace period: every open response ends cleanly
                for held in list(self.jobs.values()):
                    self._finish_early(held)
                continue
            if kind == "add":
                try:
                    self.engine.add(job.seq)  # the handler validated it; a miss fails this request alone
                except Exception as e:
                    log.exception("engine refused a request")
                    status = 400 if isinstance(e, OrthrusError) else 500
                    job.send(Event(finish_reason="error", error=APIError(status, f"cannot decode this request: {e}",
                                                                         "invalid_request_error" if status == 400 else "server_error")))
                    continue
                self.jobs[job.seq.id] = job
            elif self.jobs.pop(job.seq.id, None) is not None:
                self.engine.abort(job.seq)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:  # an engine bug: fail the requests it held, keep serving the next ones
            log.exception("engine step failed")
            self._fail_all(APIError(500, "internal error while decoding", "server_error"))
            return
        now = time.perf_counter()
        for out in outputs:
            job = self.jobs[out.sequence.id]
            if job.last_output is None:  # admitted by this cycle (a row's first cycle also prefills it)
                self.metrics.observe("orthrus:request_queue_time_seconds", started - job.arrived)
            self._deliver(job, out.new_tokens, now)

    def end_all(self) -> None:
        """End every running request now, each with a final event ("abort") and its usage."""
        self.inbox.put(("end_all", None))

    def _fail_all(self, error: APIError) -> None:
        """Fail every request the engine holds with `error`, freeing their rows."""
        for job in self.jobs.values():
            self.engine.abort(job.seq)
            job.send(Event(finish_reason="error", error=error))
        self.jobs.clear()

    def _finish_early(self, job: Job) -> None:
        self.engine.abort(job.seq)
        del self.jobs[job.seq.id]
        job.send(Event("", "abort", self._usage(job.seq, len(job.seq.generated))))

    def _usage(self, seq: Sequence, completion_tokens: int) -> Usage:
        return Usage(len(seq.prompt), completion_tokens, list(seq.stats.accepted), list(seq.stats.drafted))

    def _deliver(self, job: Job, new_tokens: list[int], now: float) -> None:
        seq, engine, m = job.seq, self.engine, self.metrics
        m.inc("orthrus:generation_tokens_total", len(new_tokens))
        if engine.mode == "orthrus" and seq.stats.drafted[-1]:  # by the planner's source: diffusion or lookup
            source = seq.stats.sources[-1]
            m.inc("orthrus:spec_decode_num_drafts_total", source=source)
            m.inc("orthrus:spec_decode_num_draft_tokens_total", seq.stats.drafted[-1], source=source)
            leaf = seq.stats.branches[-1]  # the last accepted token a tree leaf: counted as the tree's
            accepted = seq.stats.accepted[-1]
            # lookup tokens after the block draft: counted as lookup's
            extension = extension_accepted([accepted], seq.stats.drafted[-1:], seq.stats.extended[-1:])[0]
            m.inc("orthrus:spec_decode_num_accepted_tokens_total", accepted - leaf - extension, source=source)
            if leaf:
                m.inc("orthrus:spec_decode_num_accepted_tokens_total", 1, source="tree")
            if extension:
                m.inc("orthrus:spec_decode_num_accepted_tokens_total", extension, source="lookup")
            for position in range(accepted):
                by = "tree" if leaf and position == accepted - 1 else "lookup" if position >= accepted - extension else source
                m.inc("orthrus:spec_decode_num_accepted_tokens_per_pos", position=str(position), source=by)
        if job.last_output is None:
            m.observe("orthrus:time_to_first_token_seconds", now - job.arrived)
        else:  # a cycle emits several tokens at once: each gets its share of the gap
            m.observe("orthrus:inter_token_latency_seconds", (now - job.last_output) / len(new_tokens), len(new_tokens))
        job.last_output = now
        text = job.text.push(new_tokens, final=seq.finished)
        if job.text.stopped and not seq.finished:
            seq.finish_reason = "stop"
            engine.abort(seq)
        usage = None
        if seq.finished:
            del self.jobs[seq.id]
            m.observe("orthrus:e2e_request_latency_seconds", now - job.arrived)
            # a stop string ends the completion at the token that completed it, whatever came after in the block
            usage = self._usage(seq, job.text.tokens if job.text.stopped else len(seq.generated))
        job.send(Event(text, seq.finish_reason, usage))


def sse(body: dict | str) -> str:
    """One server-sent event."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class Server:
    """Admission, validation and response streaming; runs on the event loop."""

    def __init__(self, llm: Orthrus, config: ServerConfig):
        positions = llm.model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > positions:
            raise OrthrusError(f"max model length {config.max_model_len} exceeds the model's {positions} positions")
        self.llm, self.config = llm, config
        self.context = config.max_model_len or min(2048, positions)
        self.name = config.model_name or llm.name
        block = 1 if config.mode == "ar" else llm.block_size
        self.engine = Engine(llm.model, config.max_batch, self.context + block, mode=config.mode,
                             draft_confidence=config.draft_confidence,
                             pass_costs=llm.pass_costs(block) if config.mode == "orthrus" else None)
        self.metrics = Metrics(self.name)
        self.engine_loop = EngineLoop(self.engine, self.metrics)
        self.active = 0  # admitted requests not yet released: running, waiting, or being answered
        self.draining = False  # set on shutdown: new requests get 503

    # -- admission ---------------------------------------------------------------------------

    def admit(self, req: SamplingRequest, prompt: list[int], max_tokens: int | None, prompt_param: str) -> Job:
        if req.model not in (None, self.name):
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           "not_found_error", "model", "model_not_found")
        if self.engine_loop.dead:
            raise APIError(503, "the engine stopped; the server is shutting down", "server_error", code="engine_dead")
        if self.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        if field := req.unsupported():
            raise APIError(400, f"{field} is not supported by this server", param=field)
        stops = req.stop_strings
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS or not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                                "characters each", param="stop")
        try:
            params = SamplingParams(**req.sampling())
        except OrthrusError as e:  # its messages start with the offending field's name
            raise APIError(400, str(e), param=str(e).split()[0]) from None
        vocab = self.llm.model.config.vocab_size
        if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
            raise APIError(400, f"the prompt must be non-empty, with token ids in [0, {vocab})", param=prompt_param)
        if len(prompt) >= self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's context is {self.context} tokens "
                                f"(prompt + completion)", param=prompt_param, code="context_length_exceeded")
        max_tokens = self.context - len(prompt) if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if error := self.engine.capacity_error(len(prompt), max_tokens):
            raise APIError(400, error, param="max_tokens", code="context_length_exceeded")
        if self.active >= self.config.max_batch + self.config.max_queue:
            raise APIError(503, f"the server is full ({self.active} requests; --max-batch {self.config.max_batch}, "
                                f"--max-queue {self.config.max_queue}); retry later",
                           "server_overloaded", code="queue_full", headers={"Retry-After": "1"})
        self.active += 1
        self.metrics.inc("orthrus:prompt_tokens_total", len(prompt))
        arrived = time.perf_counter()
        seq = Sequence(prompt, params, max_tokens, self.llm.stop_token_ids)
        return Job(seq, TextStream(self.llm.tokenizer, req.stop_strings), arrived, arrived + self.config.request_timeout)

    def drain(self, grace: float) -> None:
        """Shutdown, first step: admit nothing more; running requests may finish for `grace`
        seconds, then each open response ends with a final chunk (finish_reason "abort") and [DONE]."""
        self.draining = True
        timer = threading.Timer(grace, self.engine_loop.end_all)
        timer.daemon = True
        timer.start()

    def release(self, job: Job) -> None:
        """Called once the response is over, however it ended (idempotent): frees the job's
        engine row if it still has one, and counts the outcome."""
        if job.released:
            return
        job.released = True
        if not job.engine_done:
            self.engine_loop.abort(job)
        self.active -= 1
        self.metrics.inc("orthrus:requests_total", outcome=job.outcome or "disconnect")

    # -- decoding ------------------------------------------------------------------------------

    async def events(self, job: Job) -> AsyncIterator[Event]:
        """Submit the job and yield its events up to the finishing one (or a timeout)."""
        self.engine_loop.submit(job)
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), max(0.0, job.deadline - time.perf_counter()))
            except TimeoutError:
                job.outcome = "timeout"
                yield Event(finish_reason="timeout", error=APIError(
                    408, f"the request took longer than the server's timeout of {self.config.request_timeout:g}s",
                    "timeout_error", code="timeout"))
                return
            if event.finish_reason:
                job.engine_done, job.outcome = True, event.finish_reason
            yield event
            if event.finish_reason:
                return

    async def complete(self, job: Job, builder: ResponseBuilder, request: Request) -> JSONResponse:
        """The whole answer at once, unless the client disconnects first (then nobody reads it)."""

        async def answer() -> JSONResponse:
            pieces = []
            async for event in self.events(job):
                if event.error:
                    return JSONResponse(event.error.body(), event.error.status)
                pieces.append(event.text)
                if event.finish_reason:
                    return JSONResponse(builder.complete("".join(pieces), event.finish_reason, event.usage))

        async def disconnect() -> None:  # the body is read: the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(answer()), asyncio.ensure_future(disconnect())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return tasks[0].result() if tasks[0].done() else JSONResponse({}, 499)
        finally:
            for task in tasks:
                task.cancel()
            self.release(job)

    async def stream(self, job: Job, builder: ResponseBuilder, include_usage: bool) -> AsyncIterator[str]:
        try:
            if builder.chat:
                yield sse(builder.chunk("", first=True))
            async for event in self.events(job):
                if event.error:
                    yield sse(event.error.body())
                    break
                if event.text:
                    yield sse(builder.chunk(event.text))
                if event.finish_reason:
                    yield sse(builder.final_chunk(event.finish_reason, event.usage))
                    if include_usage:
                        yield sse(builder.usage_chunk(event.usage))
            yield sse("[DONE]")
        finally:  # also on cancellation, when the client disconnects
            self.release(job)

    async def respond(self, request: Request, req: SamplingRequest, prompt: list[int], max_tokens: int | None,
                      prompt_param: str, chat: bool):
        job = self.admit(req, prompt, max_tokens, prompt_param)
        builder = ResponseBuilder(chat, self.name)
        if not req.stream:
            return await self.complete(job, builder, request)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # the background task releases the job if the stream is cancelled before it starts
        return StreamingResponse(self.stream(job, builder, include_usage), media_type="text/event-stream",
                                 background=BackgroundTask(self.release, job))

    async def encode(self, prompt, param: str, chat_template_kwargs: dict | None = None) -> list[int]:
        """Tokenise off the event loop: a long prompt must not stall every other stream."""
        try:
            return await asyncio.to_thread(self.llm.encode, prompt, chat_template_kwargs)
        except Exception as e:  # OrthrusError, or the chat template refusing the messages
            raise APIError(400, f"cannot encode the {param}: {e}", param=param) from None


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api key>`; /health and /metrics do not."""

    def __init__(self, app, api_key: str, server: Server):
        self.app, self.expected, self.server = app, f"Bearer {api_key}".encode(), server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                self.server.metrics.inc("orthrus:requests_total", outcome="rejected")
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                await JSONResponse(error.body(), 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it says its length or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse(too_large.body(), 413)(scope, receive, send)
        seen, exceeded, started = 0, False, False

        async def counted():  # past the limit, the app is told the client left; its answer is dropped
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            nonlocal started
            if not exceeded:
                started = True
                await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await JSONResponse(too_large.body(), 413)(scope, receive, send)


ERROR_BODY = {"application/json": {"schema": {"type": "object", "properties": {"error": {
    "type": "object", "properties": {k: {"type": "string", "nullable": True} for k in ("message", "type", "param", "code")}}}}}}
# What the completion routes really answer, for the OpenAPI document (which otherwise claims a 422
# this server never sends and no event stream).
COMPLETION_RESPONSES = {
    200: {"description": "The completion (JSON), or with `stream: true` server-sent events ending in `data: [DONE]`.",
          "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}},
    **{status: {"description": what, "content": ERROR_BODY} for status, what in (
        (400, "Invalid request: malformed JSON, a field out of range or unsupported (named in `error.param`)."),
        (401, "Missing or wrong API key (when the server has one)."),
        (404, "Unknown model."),
        (408, "The request outlived the server's request timeout."),
        (413, "The request body is over the size limit."),
        (500, "Internal error while decoding this request (other requests are unaffected)."),
        (503, "The server is full, shutting down, or its engine stopped."))},
}


def openapi_without_422(app: FastAPI) -> dict:
    """FastAPI's document minus the 422 it adds to every route with a body: validation errors are 400 here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(llm: Orthrus, config: ServerConfig | None = None) -> FastAPI:
    server = Server(llm, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine_loop.start()
        yield
        server.engine_loop.stop()

    app = FastAPI(title="orthrus", lifespan=lifespan)
    app.openapi = lambda: openapi_without_422(app)
    app.state.server = server
    if server.config.api_key:
        app.add_middleware(BearerAuth, api_key=server.config.api_key, server=server)
    app.add_middleware(BodyLimit, limit=server.config.max_request_bytes)

    def reject(error: APIError) -> JSONResponse:
        server.metrics.inc("orthrus:requests_total", outcome="rejected")
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return reject(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return reject(APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"))
        param = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        return reject(APIError(400, f"{param}: {first['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), e.status_code, headers=e.headers)

    @app.post("/v1/chat/completions", responses=COMPLETION_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        prompt = await server.encode([m.as_dict() for m in req.messages], "messages", req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await server.respond(request, req, prompt, max_tokens, "messages", chat=True)

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if prompt and isinstance(prompt, list) and isinstance(prompt[0], (str, list)):  # a batch of prompts
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (concurrent requests are batched together)", param="prompt")
            prompt = prompt[0]
        ids = await server.encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        return await server.respond(request, req, ids, req.max_tokens, "prompt", chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0, "owned_by": "orthrus",
                                            "max_model_len": server.context}]}

    @app.get("/health", responses={503: {"description": "The engine stopped.", "content": {"application/json": {}}}})
    async def health():
        if server.engine_loop.dead or not server.engine_loop.thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format 0.0.4.", "content": {"text/plain": {}}}})
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
