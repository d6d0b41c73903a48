"""OpenAI-compatible transcription server over the in-flight batching engine.

``POST /v1/audio/transcriptions`` takes OpenAI's multipart form (``file``, ``model``, ``response_format``
json | text | verbose_json | srt | vtt, ``stream``, ``language``) and answers in OpenAI's shapes, errors included
(``{"error": {"message", "type", "param", "code"}}``), so the official clients work unchanged. With
``stream=true`` the answer is server-sent events: ``transcript.text.delta`` events, then one
``transcript.text.done`` (the shape of OpenAI's streaming transcription models).

Every request is decoded and checked in the server (size, duration, decodability) before the engine sees it, so
a bad one is answered alone with a 4xx. A client that goes away has its request cancelled in the engine, which
frees its KV blocks at the next step. Shutdown (SIGTERM) stops accepting connections, lets in-flight requests
finish, then drains and closes the engine.

With an API key (``--api-key`` or $CANARY_TRT_API_KEY) every route but the probes ``/health`` and ``/ready`` needs
``Authorization: Bearer <key>``; ``/metrics`` too, since queue depths and error counts describe the traffic
(Prometheus sends the key with ``authorization: {credentials: ...}`` in its scrape config).

FastAPI, uvicorn, python-multipart and prometheus-client (extra ``serving``) are imported only when an app is
built, so the CLI can list ``serve`` without them.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request), which are
# imported inside create_app.
import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .common import TRAINED_MAX_SECONDS
from .audio import TARGET_RATE, AudioError, AudioTooLong, load_audio
from .engine import EngineClosed, QueueFull
from .options import EngineOptions

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around the file
API_KEY_ENV = "CANARY_TRT_API_KEY"
OPEN_PATHS = ("/health", "/ready")  # probes answer without the API key
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "canary-qwen-2.5b"  # the id clients pass as `model` and /v1/models lists
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's own upload limit
    max_audio_seconds: float = TRAINED_MAX_SECONDS  # longer audio -> 413; raise it to accept long-form audio
    # Audio longer than this is transcribed long-form: cut at pauses into segments of at most this long
    # (runtime.longform), each an ordinary engine request; verbose_json/srt/vtt then carry one entry per segment.
    long_form_seconds: float = TRAINED_MAX_SECONDS
    retry_after_s: int = 1  # Retry-After of 429 (queue full) and 503 (shutting down)
    api_key: str | None = field(default=None, repr=False)  # None: no authentication; never printed

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")  # would otherwise accept a bare "Bearer"


class ApiError(Exception):
    """An answer in OpenAI's error shape; ``kind`` is the `code` and the errors-by-kind metric label."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request"}

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.kind}}


class _RequireApiKey:
    """ASGI middleware: HTTP requests outside OPEN_PATHS need ``Authorization: Bearer <key>``, checked before the
    body is read. Plain ASGI (not ``@app.middleware``) so streaming and disconnect detection stay untouched."""

    def __init__(self, app, key: str, reject):
        self.app, self.key, self.reject = app, key.encode(), reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # compare_digest: the time taken does not tell how much of a guess was right
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                return await self.reject(bool(token))(scope, receive, send)
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _limit_body(receive, limit: int):
    """Wrap an ASGI ``receive`` to stop reading a request body (sent without Content-Length) past ``limit``."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return wrapped


async def _disconnected(receive) -> None:
    """Return when the client goes away. Only valid once the body is read: then the server's next message for
    this request can only be ``http.disconnect``."""
    while (await receive())["type"] != "http.disconnect":
        pass


def format_transcription(fmt: str, text: str, duration: float, token_ids: list[int]):
    """The body of a finished transcription in ``fmt``: a dict (JSON) or a string. The model gives no timestamps,
    so verbose_json, srt and vtt have one segment spanning the whole audio."""
    if fmt == "json":
        return {"text": text, "usage": {"type": "duration", "seconds": duration}}
    if fmt == "text":
        return text + "\n"
    if fmt == "verbose_json":
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": token_ids,
                   "temperature": 0.0}  # greedy decoding
        return {"task": "transcribe", "language": "english", "duration": duration, "text": text,
                "segments": [segment], "usage": {"type": "duration", "seconds": duration}}
    if fmt in ("srt", "vtt"):
        from .longform import LongTranscription, Segment, to_srt, to_vtt

        whole = LongTranscription(text, [Segment(0.0, duration, text, token_ids, "stop")], duration, "none")
        return to_srt(whole) if fmt == "srt" else to_vtt(whole)
    raise ValueError(fmt)


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        Gauge("canary_queue_depth", "Requests accepted and waiting for admission", registry=r).set_function(
            lambda: engine.stats()["queued"])
        Gauge("canary_running_sequences", "Sequences in the running batch", registry=r).set_function(
            lambda: engine.stats()["running"])
        Gauge("canary_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(
            lambda: engine.stats()["kv_blocks_used"])
        self.in_progress = Gauge("canary_requests_in_progress", "HTTP transcription requests being served",
                                 registry=r)
        self.latency = Histogram("canary_request_latency_seconds", "Upload received to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("canary_time_to_first_token_seconds", "Upload received to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.audio = Counter("canary_audio_seconds", "Seconds of audio transcribed", registry=r)
        self.tokens = Counter("canary_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("canary_requests_finished", "Transcriptions by finish reason", ["reason"],
                                registry=r)
        self.errors = Counter("canary_request_errors", "Failed requests by kind", ["kind"], registry=r)

    def done(self, t0: float, handle, result) -> None:
        self.finished.labels(result.finish_reason).inc()
        self.audio.inc(result.duration)
        self.tokens.inc(len(result.token_ids))
        if result.finish_reason != "cancelled":
            self.latency.observe(handle.finished_at - t0)
            if handle.first_token_at is not None:
                self.ttft.observe(handle.first_token_at - t0)


def create_app(engine, settings: ServerSettings = ServerSettings()):
    """The FastAPI app serving ``engine``. Its shutdown drains and closes the engine."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    metrics = _Metrics(engine)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        state["ready"] = True
        yield
        state["ready"] = False  # uvicorn has already waited for in-flight requests
        await asyncio.to_thread(engine.close)
        log.info("engine drained and closed")

    app = FastAPI(title="canary-trt", lifespan=lifespan)

    def error_response(e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.kind).inc()
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def unauthorized(key_given: bool) -> JSONResponse:  # names neither the key nor the guess
        message = ("incorrect API key provided" if key_given else
                   "missing API key: send it as the header 'Authorization: Bearer <key>'")
        response = error_response(ApiError(401, message, "invalid_api_key"))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    if settings.api_key is not None:
        app.add_middleware(_RequireApiKey, key=settings.api_key, reject=unauthorized)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # 404/405 routes, malformed multipart: OpenAI's shape
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error_response(ApiError(exc.status_code, str(exc.detail), kind))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "model": settings.model_name, **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "canary-trt"}]}

    async def read_request(request: Request) -> tuple[bytes, str, bool]:
        """The uploaded bytes, response format and stream flag, or ApiError naming what is wrong."""
        limit = settings.max_upload_bytes + FORM_OVERHEAD
        too_large = ApiError(413, f"upload larger than the limit of {settings.max_upload_bytes} bytes",
                             "upload_too_large", "file")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # answered without reading the body
        try:
            form = await Request(request.scope, _limit_body(request.receive, limit)).form(max_files=1,
                                                                                           max_fields=32)
        except _BodyTooLarge:
            raise too_large from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "missing the audio upload: send it as the multipart file field 'file'",
                               "missing_file", "file")
            model = form.get("model") or settings.model_name
            if model != settings.model_name:
                raise ApiError(404, f"model {model!r} does not exist; this server serves {settings.model_name!r}",
                               "model_not_found", "model")
            fmt = form.get("response_format") or "json"
            if fmt not in RESPONSE_FORMATS:
                raise ApiError(400, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                               "invalid_response_format", "response_format")
            stream = str(form.get("stream") or "false").lower()
            if stream not in ("true", "false"):
                raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_stream", "stream")
            language = str(form.get("language") or "en").lower()
            if language not in ("en", "english"):
                raise ApiError(400, f"language {language!r} is not supported: this model transcribes English",
                               "unsupported_language", "language")
            data = await upload.read()
        finally:
            await form.close()
        if len(data) > settings.max_upload_bytes:
            raise too_large
        return data, fmt, stream == "true"

    async def decode(data: bytes) -> np.ndarray:
        try:  # decoding is CPU work: off the event loop; it stops past the limit (compressed silence is tiny)
            return await asyncio.to_thread(load_audio, data, max_seconds=settings.max_audio_seconds)
        except AudioTooLong:
            raise ApiError(413, f"audio is longer than the limit of {settings.max_audio_seconds:g} s: split it",
                           "audio_too_long", "file") from None
        except AudioError as e:
            raise ApiError(400, f"invalid audio file: {e}", "invalid_audio", "file") from None

    async def long_form(wave: np.ndarray, fmt: str, stream: bool):
        """Segments through the engine (in a worker thread: transcribe_long waits on their results)."""
        from .longform import to_srt, to_vtt, transcribe_long

        try:
            t = await asyncio.to_thread(transcribe_long, engine, wave, TARGET_RATE,
                                        max_segment_s=settings.long_form_seconds)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "queue_full", retry_after=settings.retry_after_s) from None
        except Exception as e:
            raise failed(e) from None
        usage = {"type": "duration", "seconds": t.duration}
        if stream:  # one delta per segment, then the whole text
            async def events():
                for seg in (s for s in t.segments if s.text):
                    yield f"data: {json.dumps({'type': 'transcript.text.delta', 'delta': seg.text + ' '})}\n\n"
                yield f"data: {json.dumps({'type': 'transcript.text.done', 'text': t.text})}\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(to_srt(t) if fmt == "srt" else to_vtt(t),
                                     media_type="text/vtt" if fmt == "vtt" else "text/plain")
        if fmt == "text":
            return PlainTextResponse(t.text + "\n")
        if fmt == "json":
            return JSONResponse({"text": t.text, "usage": usage})
        segments = [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": s.token_ids,
                     "temperature": 0.0} for i, s in enumerate(t.segments)]
        return JSONResponse({"task": "transcribe", "language": "english", "duration": t.duration, "text": t.text,
                             "segments": segments, "usage": usage})

    async def submit(wave: np.ndarray, t0: float):
        """Queue decoded audio in the engine. Returns the handle and an asyncio queue of text deltas ending
        with None."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()

        def finished():  # every finished request, answered or cancelled, is counted here
            try:
                metrics.done(t0, handle, handle.result(0))
            except Exception:
                pass  # failures are counted where they are answered

        def on_delta(delta):  # engine thread; must never raise there (it would fail the whole batch)
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
                if delta is None:
                    loop.call_soon_threadsafe(finished)  # runs after submit() has returned the handle
            except RuntimeError:  # the loop is gone: nobody is listening any more
                pass

        try:
            handle = engine.submit(wave, TARGET_RATE, on_delta=on_delta)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", "queue_full", retry_after=settings.retry_after_s) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), "shutting_down", retry_after=settings.retry_after_s) from None
        except ValueError as e:  # too long for max_seq_len or the KV pool
            raise ApiError(413, str(e), "audio_too_long", "file") from None
        return handle, deltas

    def failed(e: Exception) -> ApiError:
        log.error("transcription failed: %s", e)
        return ApiError(500, f"transcription failed: {e}", "internal_error")

    async def sse(handle, deltas: asyncio.Queue):
        # Starlette cancels this generator when the client disconnects: `finally` then cancels the request.
        try:
            while (delta := await deltas.get()) is not None:
                yield f"data: {json.dumps({'type': 'transcript.text.delta', 'delta': delta})}\n\n"
            try:
                result = handle.result(0)
            except Exception as e:  # the engine failed it: tell the client in the stream (OpenAI's error event)
                error = failed(e)
                metrics.errors.labels(error.kind).inc()
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            yield f"data: {json.dumps({'type': 'transcript.text.done', 'text': result.text})}\n\n"
        finally:
            if not handle.done():
                handle.cancel()
                metrics.errors.labels("client_disconnected").inc()
            metrics.in_progress.dec()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        metrics.in_progress.inc()
        streaming = False
        try:
            data, fmt, stream = await read_request(request)
            t0 = time.perf_counter()
            wave = await decode(data)
            if len(wave) > settings.long_form_seconds * TARGET_RATE:
                return await long_form(wave, fmt, stream)
            handle, deltas = await submit(wave, t0)
            if stream:
                streaming = True  # the generator owns in_progress from here
                return StreamingResponse(sse(handle, deltas), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            finished = asyncio.ensure_future(_wait_end(deltas))
            gone = asyncio.ensure_future(_disconnected(request.receive))
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            gone.cancel()
            if not handle.done():  # the client went away first: free the engine for the others
                handle.cancel()
                raise ApiError(499, "client disconnected", "client_disconnected")
            try:
                result = handle.result(0)
            except Exception as e:
                raise failed(e) from None
            body = format_transcription(fmt, result.text, result.duration, result.token_ids)
            if isinstance(body, dict):
                return JSONResponse(body)
            return PlainTextResponse(body, media_type="text/vtt" if fmt == "vtt" else "text/plain")
        except ApiError as e:
            return error_response(e)
        finally:
            if not streaming:
                metrics.in_progress.dec()

    return app


async def _wait_end(deltas: asyncio.Queue) -> None:
    while await deltas.get() is not None:
        pass


# ---- command line: `canary-trt serve` ---------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``canary-trt serve``."""
    from .options import add_engine_arguments

    add_engine_arguments(parser)
    d = ServerSettings()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=d.model_name, help="the `model` clients pass (%(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                        help="larger uploads get 413 (default: %(default)s)")
    parser.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                        help="longer audio gets 413; raise it (e.g. 3600) to accept long audio (default: %(default)s)")
    parser.add_argument("--long-form-seconds", type=float, default=d.long_form_seconds,
                        help="longer audio is cut at pauses into segments of at most this long, with timestamps "
                             "(default: %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to let in-flight requests finish after SIGTERM (default: %(default)s)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' (not on /health, /ready); default: ${API_KEY_ENV}, "
                             f"which other users cannot read in the process list, unlike this flag")


def serve(engine, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float | None = 300.0) -> None:
    """Serve until SIGINT/SIGTERM; then finish in-flight requests (up to ``drain_timeout`` s) and close. uvicorn
    re-raises the signal afterwards, so the process ends as terminated by it (what process managers expect)."""
    import uvicorn

    app = create_app(engine, settings)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info")


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the ``serve`` arguments; the API key from --api-key, else the environment."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return ServerSettings(model_name=args.served_model_name, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          max_audio_seconds=args.max_audio_seconds, long_form_seconds=args.long_form_seconds,
                          api_key=key)


def run(args: argparse.Namespace) -> int:
    """``canary-trt serve``."""
    from .options import engine_kwargs
    from .engine import Engine

    try:
        settings = server_settings(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_pretrained(**engine_kwargs(args))
    except (OSError, ValueError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    serve(engine, settings, args.host, args.port, args.drain_timeout)
    return 0
