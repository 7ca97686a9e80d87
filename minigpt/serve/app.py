"""The HTTP side: a Starlette app speaking the OpenAI API over the engine.

    GET  /v1/models             the one model this server serves
    POST /v1/completions        prompt (string, strings, token ids), n, stop, seed, echo, stream
    POST /v1/chat/completions   messages through the plain template of serve.protocol
    GET  /health                {"status": "ok" | "draining", ...}
    GET  /metrics               Prometheus text (serve.metrics)

Streaming answers are server-sent events, one `data: {chunk}` per text piece, ending in
`data: [DONE]`. Every refusal is an OpenAI error body with a 4xx status (429 and 503 with
Retry-After); a fault of our own is a 500 with the same body, never a traceback. A client that
disconnects, streaming or not, has its sequences dropped from the batch at the next step.
With an API key, /v1/* needs `Authorization: Bearer KEY`.
"""

import asyncio
import hmac
import json
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from minigpt.serve import protocol
from minigpt.serve.engine import Engine, Job
from minigpt.serve.protocol import ApiError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far beyond any prompt that fits a context


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    """The app's state: the engine, the model's name and sizes, the key."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.metrics = engine.metrics
        cfg = engine.model.cfg
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size

    # ---- the routes ------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        self.metrics.add("minigpt_requests_total", endpoint=request.url.path, status=200)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created,
             "owned_by": "minigpt", "max_model_len": self.block_size}]})

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "draining" if e.draining else "ok", "model": self.model_name,
                             "running": len(e.running), "queued": len(e.waiting),
                             "max_batch": e.max_batch, "energy_basis": e.energy.basis.value,
                             "energy_note": e.energy.note})

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # ---- the work ----------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", None,
                           "invalid_api_key", "authentication_error")

    async def _body(self, request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                           None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                               None, "request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested beyond Python's stack
            raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None

    async def _generate(self, request: Request, chat: bool) -> Response:
        self._authorize(request)
        body = await self._body(request)
        tok = self.engine.tokenizer
        req = protocol.parse(body, chat, self.model_name, tok, self.vocab_size, self.block_size)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def wake(ev):  # from the model's thread
            loop.call_soon_threadsafe(events.put_nowait, ev)

        texts: dict[int, list[str]] = {}
        if req.stream:
            sink = wake
        else:
            # a whole answer needs its text only at the end: the model's thread keeps the pieces
            # rather than waking this loop for every token of every sequence (a wake-up takes the
            # interpreter lock and a core from the step running beside it)
            def sink(ev):
                if ev[0] == "delta":
                    texts.setdefault(ev[1], []).append(ev[2])
                else:
                    wake(ev)
        job = Job(req, tok, sink)
        self.engine.submit(job)
        self.metrics.add("minigpt_requests_total", endpoint=request.url.path, status=200)
        rid, created = protocol.new_id(chat), protocol.now()
        if req.stream:
            return StreamingResponse(self._stream(job, events, rid, created),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(request, job, events, texts, rid, created)

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue,
                     texts: dict[int, list[str]], rid: str, created: int) -> Response:
        """Wait for the job's end, or the client's leaving (then cancel it). texts: each
        choice's pieces, which the job's sink keeps as they come."""
        req = job.request
        reasons = {}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    self.engine.cancel(job)
                    return Response(status_code=499)  # nobody is there to read it
                ev = get.result()
                if ev[0] == "finish":
                    reasons[ev[1]] = ev[2]
                elif ev[0] == "error":
                    raise ApiError(500, ev[1], None, "generation_failed", "server_error")
                else:
                    usage = ev[1]
                    break
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        finally:
            gone.cancel()
        choices = []
        for s in job.slots:
            text = "".join(texts.get(s.index, ()))
            if req.echo:
                text = req.prompt_texts[s.index // req.n] + text
            choices.append(protocol.choice(req.chat, s.index, text, reasons[s.index]))
        return JSONResponse(protocol.document(req.chat, rid, created, self.model_name, choices,
                                              usage.to_json()))

    async def _stream(self, job: Job, events: asyncio.Queue, rid: str, created: int):
        """Server-sent events; a client that leaves cancels this generator, and so the job."""
        req = job.request

        def sse(choices, usage=None) -> str:
            doc = protocol.document(req.chat, rid, created, self.model_name, choices, usage,
                                    chunk=True)
            if not req.include_usage:
                doc.pop("usage")
            return f"data: {json.dumps(doc)}\n\n"

        started = set()
        try:
            if req.chat:  # the role comes first, as OpenAI sends it
                yield sse([protocol.chunk_choice(True, s.index, "", None, first=True)
                           for s in job.slots])
                started = {s.index for s in job.slots}
            elif req.echo:
                for s in job.slots:
                    yield sse([protocol.chunk_choice(False, s.index,
                                                     req.prompt_texts[s.index // req.n], None)])
            while True:
                ev = await events.get()
                if ev[0] == "delta":
                    first = ev[1] not in started
                    started.add(ev[1])
                    yield sse([protocol.chunk_choice(req.chat, ev[1], ev[2], None, first)])
                elif ev[0] == "finish":
                    yield sse([protocol.chunk_choice(req.chat, ev[1], None if req.chat else "",
                                                     ev[2])])
                elif ev[0] == "error":
                    err = ApiError(500, ev[1], None, "generation_failed", "server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                else:
                    if req.include_usage:
                        yield sse([], ev[1].to_json())
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not job.cancelled and job.open:
                self.engine.cancel(job)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(server: Server) -> Starlette:
    async def api_error(request: Request, exc: ApiError) -> Response:
        path = request.url.path
        server.metrics.add("minigpt_requests_total", endpoint=path if path.startswith("/v1/") else "other",
                           status=exc.status)
        return error_response(exc)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                       f"{exc.detail}", None, code))

    async def disconnect(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def fault(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", None,
                                       "internal_error", "server_error"))

    routes = [Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_text, methods=["GET"])]
    app = Starlette(routes=routes,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        ClientDisconnect: disconnect, Exception: fault})
    return app
