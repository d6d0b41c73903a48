"""OpenAI-compatible transcription server over the in-flight batching engine.

``POST /v1/audio/transcriptions`` takes OpenAI's multipart form (``file``, ``model``, ``response_format``
json | text | verbose_json | srt | vtt, ``stream``, ``language``, ``temperature`` 0, ``include[]=logprobs``,
``timestamp_granularities[]`` segment | word, ``chunking_strategy``) and answers in OpenAI's shapes, errors
included (``{"error": {"message", "type", "param", "code"}}``), so the official clients work unchanged. A field it
does not implement (``prompt``, sampling, anything unknown), or one the request's model cannot honour (word
timestamps from Canary-Qwen, logprobs from Parakeet-TDT), is a 400 naming it and the model, never ignored. With
``stream=true`` the answer is server-sent events: ``transcript.text.delta`` events, then one
``transcript.text.done`` with the text and usage (the shape of OpenAI's streaming transcription models).

Several engines may be served, each under its name: the request's ``model`` picks the engine, a Canary-Qwen
``runtime.Engine`` or a Parakeet-TDT ``runtime.parakeet.ParakeetEngine`` (``load_engine`` tells them apart by the
model's config). Parakeet's results carry token, word and segment timestamps: its verbose_json has the model's
own sentence segments and, when asked for, its words; srt/vtt use them. Canary-Qwen gives no timestamps: one
segment per transcribed piece. Audio longer than ``long_form_seconds`` (or any audio with a ``chunking_strategy``)
is cut at pauses (runtime.longform) and its segments go through the engine at most ``long_form_window`` at a
time, so one long upload cannot starve the short requests behind it; they stream in order as they finish, and a
client that leaves cancels all of them. A Parakeet-TDT segment's timestamps are offset into the whole audio.

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

from engine.checkpoint import DEFAULT_MODEL

from .audio import TARGET_RATE, AudioError, AudioTooLong, load_audio
from .common import TRAINED_MAX_SECONDS
from .engine import EngineClosed, QueueFull
from .longform import (InOrder, LongTranscription, VadSettings, cut_points, join_texts, model_timestamps,
                       no_speech_prob, segments_from, speech_scores, to_srt, to_vtt)
from .openai_api import (ApiError, TranscriptionRequest, format_transcription, has_timestamps, parse_form,
                         token_logprobs, verbose_json)

log = logging.getLogger(__name__)

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around the file
API_KEY_ENV = "CANARY_TRT_API_KEY"
OPEN_PATHS = ("/health", "/ready")  # probes answer without the API key
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_MAX_AUDIO_SECONDS = 3 * 3600.0


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "canary-qwen-2.5b"  # the id clients pass as `model` (one engine; several: a dict to create_app)
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's own upload limit
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS  # longer audio -> 413 (decoding stops there)
    # Audio longer than this is transcribed long-form: cut at pauses into segments of at most this long
    # (runtime.longform), each an ordinary engine request; verbose_json/srt/vtt then carry one entry per segment.
    long_form_seconds: float = TRAINED_MAX_SECONDS
    # Segments of one long-form request in the engine at once (the next goes in as one finishes), so one long
    # upload cannot fill the batch while short requests wait. None: a quarter of the engine's max_batch_size.
    long_form_window: int | None = None
    retry_after_s: int = 1  # Retry-After of 429 (queue full) and 503 (shutting down)
    api_key: str | None = field(default=None, repr=False)  # None: no authentication; never printed

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")  # would otherwise accept a bare "Bearer"
        if self.long_form_window is not None and self.long_form_window < 1:
            raise ValueError(f"long_form_window must be >= 1, got {self.long_form_window}")


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


def _token_usage(engine, pieces: list[int], output_tokens: int) -> dict | None:
    """OpenAI's token usage (``transcript.text.done``): prompt tokens (text + audio frames) of each of
    ``pieces`` (sample counts) and the tokens generated; None for an engine that cannot count them."""
    try:
        ids = engine.tokenizer.prompt_ids(engine.options.prompt)
        prompts = [engine.prompt_tokens(n, ids) for n in pieces]
    except AttributeError:
        return None
    text = (len(ids) - 1) * len(pieces)  # the audio tag is replaced by the audio frames
    inputs = sum(prompts)
    return {"type": "tokens", "input_tokens": inputs, "output_tokens": output_tokens,
            "total_tokens": inputs + output_tokens,
            "input_token_details": {"text_tokens": text, "audio_tokens": inputs - text}}


def _stats(engine) -> dict:
    """The gauges' numbers of one engine: queued (waiting for a batch), running, KV blocks used. A ParakeetEngine
    has no KV cache, and its ``queued`` counts every unfinished request: running is the rest after ``waiting``
    (requests just submitted, not yet seen by the engine thread, count as running for that moment)."""
    s = engine.stats()
    if "running" in s:
        return s
    return {**s, "queued": s["waiting"], "running": s["queued"] - s["waiting"], "kv_blocks_used": 0}


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process). Gauges sum over
    the served engines; long-form segments are counted apart from whole requests."""

    def __init__(self, engines: dict, runs: set):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        def total(key):
            return lambda: sum(_stats(e)[key] for e in engines.values())

        r = self.registry = CollectorRegistry()
        Gauge("canary_queue_depth", "Requests (and long-form segments) accepted and waiting for admission",
              registry=r).set_function(total("queued"))
        Gauge("canary_running_sequences", "Sequences in the running batch", registry=r).set_function(
            total("running"))
        Gauge("canary_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(total("kv_blocks_used"))
        Gauge("canary_long_form_requests", "Long-form requests being transcribed", registry=r).set_function(
            lambda: len(runs))
        Gauge("canary_long_form_segments_waiting", "Long-form segments planned, not yet submitted to the engine",
              registry=r).set_function(lambda: sum(run.waiting for run in runs))
        Gauge("canary_long_form_segments_in_flight", "Long-form segments in the engine (queued or running)",
              registry=r).set_function(lambda: sum(run.in_flight for run in runs))
        self.segments = Counter("canary_long_form_segments_finished", "Long-form segments by finish reason",
                                ["reason"], registry=r)
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


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def create_app(engine, settings: ServerSettings = ServerSettings()):
    """The FastAPI app serving ``engine`` under ``settings.model_name``, or a dict {served name: engine} (the
    first is the default for requests without ``model``). Its shutdown drains and closes the engines."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    engines = dict(engine) if isinstance(engine, dict) else {settings.model_name: engine}
    if not engines:
        raise ValueError("no engine to serve")
    default_model = next(iter(engines))
    runs: set = set()  # long-form runs in progress
    metrics = _Metrics(engines, runs)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        state["ready"] = True
        yield
        state["ready"] = False  # uvicorn has already waited for in-flight requests
        for e in engines.values():
            await asyncio.to_thread(e.close)
        log.info("engines drained and closed")

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
        each = [_stats(e) for e in engines.values()]
        stats = {k: sum(s.get(k, 0) for s in each) for k in dict.fromkeys(k for s in each for k in s)}
        return {"status": "ready", "model": default_model, "models": list(engines), **stats}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "canary-trt"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in engines]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in engines:
            return error_response(ApiError(404, f"model {model_id!r} does not exist; this server serves "
                                                f"{', '.join(map(repr, engines))}", "model_not_found", "model"))
        return model_card(model_id)

    async def read_form(request: Request):
        limit = settings.max_upload_bytes + FORM_OVERHEAD
        too_large = ApiError(413, f"upload larger than the limit of {settings.max_upload_bytes} bytes",
                             "upload_too_large", "file")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # answered without reading the body
        try:
            return await Request(request.scope, _limit_body(request.receive, limit)).form(max_files=1,
                                                                                          max_fields=64)
        except _BodyTooLarge:
            raise too_large from None

    async def read_request(request: Request) -> TranscriptionRequest:
        """The checked form with the uploaded bytes, or ApiError naming what is wrong."""
        form = await read_form(request)
        try:
            req = parse_form(form, engines, default_model)
            req.data = await form.get("file").read()
        finally:
            await form.close()
        if len(req.data) > settings.max_upload_bytes:
            raise ApiError(413, f"{req.filename}: upload larger than the limit of {settings.max_upload_bytes} "
                                f"bytes", "upload_too_large", "file")
        return req

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        try:
            await (await read_form(request)).close()  # read the upload, so the client gets the answer
        except ApiError:
            pass
        return error_response(ApiError(400, "this model transcribes English; it does not translate (use "
                                            "/v1/audio/transcriptions)", "unsupported_task"))

    async def decode(req: TranscriptionRequest) -> np.ndarray:
        try:  # decoding is CPU work: off the event loop; it stops past the limit (compressed silence is tiny)
            return await asyncio.to_thread(load_audio, req.data, max_seconds=settings.max_audio_seconds,
                                           name=req.filename)
        except AudioTooLong:
            raise ApiError(413, f"{req.filename}: audio is longer than the limit of "
                                f"{settings.max_audio_seconds:g} s: split it", "audio_too_long", "file") from None
        except AudioError as e:
            raise ApiError(400, f"invalid audio file: {e}", "invalid_audio", "file") from None

    def submit_error(e: Exception) -> ApiError:
        if isinstance(e, QueueFull):
            return ApiError(429, f"server busy: {e}", "queue_full", retry_after=settings.retry_after_s)
        if isinstance(e, EngineClosed):
            return ApiError(503, str(e), "shutting_down", retry_after=settings.retry_after_s)
        if isinstance(e, ValueError):  # (AudioTooLong included) too long for max_seq_len or the KV pool
            return ApiError(413, str(e), "audio_too_long", "file")
        return failed(e)

    def failed(e: Exception) -> ApiError:
        log.error("transcription failed: %s", e)
        return ApiError(500, f"transcription failed: {e}", "internal_error")

    def logprobs_body(engine, token_ids, logprobs):
        if logprobs is None:
            raise ApiError(400, "logprobs not available from this decoder", "logprobs_unavailable", "include")
        return token_logprobs(engine.tokenizer, token_ids, logprobs)

    async def long_form(engine, req: TranscriptionRequest, wave: np.ndarray, request: Request):
        """Segments through the engine, at most ``window`` at once, delivered in order as they finish."""
        score, vad = await asyncio.to_thread(speech_scores, wave)
        # chunking_strategy: a segment per speech span it finds; else spans grouped up to long_form_seconds
        cuts = cut_points(score, len(wave), settings.long_form_seconds, req.chunking or VadSettings(),
                          group=req.chunking is None)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()

        def on_end(i, r):  # every segment that was in the engine
            if not isinstance(r, BaseException):
                metrics.segments.labels(r.finish_reason).inc()
                metrics.tokens.inc(len(r.token_ids))

        def on_done():
            runs.discard(run)
            results.put_nowait(None)

        window = settings.long_form_window or max(1, engine.options.max_batch_size // 4)
        run = InOrder(lambda piece, cb: engine.submit(piece, TARGET_RATE, on_delta=cb), [wave[a:b] for a, b in cuts],
                      window, lambda i, r: results.put_nowait((i, r)), on_done, call=loop.call_soon_threadsafe,
                      on_end=on_end)
        runs.add(run)
        run.start()

        async def segments():
            """Each segment's Transcription in order; an ApiError for the first failure (the rest cancelled)."""
            while (item := await results.get()) is not None:
                if isinstance(item[1], BaseException):
                    run.cancel()
                    raise submit_error(item[1])
                yield item[1]

        def whole(done: list) -> tuple[LongTranscription, list[dict] | None]:
            """The joined transcription; with a model's own timestamps, its segments and words (else None), with
            the pieces' offsets added."""
            if has_timestamps(engine):
                segments, words = model_timestamps(cuts, done, score)
            else:
                segments, words = segments_from(cuts, done, score), None
            t = LongTranscription(join_texts(r.text for r in done), segments, len(wave) / TARGET_RATE, vad)
            metrics.audio.inc(t.duration)
            return t, words

        def logprobs(done: list):
            if any(r.logprobs is None for r in done):
                return logprobs_body(engine, [], None)
            return logprobs_body(engine, [i for r in done for i in r.token_ids], [x for r in done for x in r.logprobs])

        def usage(done: list):
            return _token_usage(engine, [b - a for a, b in cuts], sum(len(r.token_ids) for r in done)) or \
                {"type": "duration", "seconds": len(wave) / TARGET_RATE}

        if req.stream:  # each segment's text once it and all before it are done; spaces lead, never trail
            async def events():
                done, sent = [], False
                try:
                    async for r in segments():
                        done.append(r)
                        if r.text:
                            yield _sse({"type": "transcript.text.delta", "delta": (" " if sent else "") + r.text})
                            sent = True
                    t, _ = whole(done)
                    event = {"type": "transcript.text.done", "text": t.text, "usage": usage(done)}
                    if req.logprobs:
                        event["logprobs"] = logprobs(done)
                    yield _sse(event)
                except ApiError as e:  # OpenAI's error event
                    metrics.errors.labels(e.kind).inc()
                    yield _sse(e.body())
                finally:
                    if not run.done:  # the client went away: cancel every segment, queued or running
                        run.cancel()
                        metrics.errors.labels("client_disconnected").inc()
                    metrics.in_progress.dec()
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def collect():
            return [r async for r in segments()]

        collected = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request.receive))
        await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not collected.done():  # the client went away first: free the engine for the others
            run.cancel()
            collected.cancel()
            raise ApiError(499, "client disconnected", "client_disconnected")
        done = collected.result()  # raises the ApiError of a failed segment
        t, words = whole(done)
        if req.fmt in ("srt", "vtt"):
            return PlainTextResponse(to_srt(t) if req.fmt == "srt" else to_vtt(t),
                                     media_type="text/vtt" if req.fmt == "vtt" else "text/plain")
        if req.fmt == "text":
            return PlainTextResponse(t.text + "\n")
        body = {"text": t.text, "usage": {"type": "duration", "seconds": t.duration}}
        if req.fmt == "json":
            if req.logprobs:
                body["logprobs"] = logprobs(done)
            return JSONResponse(body)
        return JSONResponse(verbose_json(t, words, req.granularities))

    async def submit(engine, wave: np.ndarray, t0: float):
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
        except (QueueFull, EngineClosed, ValueError) as e:
            raise submit_error(e) from None
        return handle, deltas

    async def sse(engine, req, handle, deltas: asyncio.Queue, n_samples: int):
        # Starlette cancels this generator when the client disconnects: `finally` then cancels the request.
        try:
            while (delta := await deltas.get()) is not None:
                yield _sse({"type": "transcript.text.delta", "delta": delta})
            try:
                result = handle.result(0)
            except Exception as e:  # the engine failed it: tell the client in the stream (OpenAI's error event)
                error = failed(e)
                metrics.errors.labels(error.kind).inc()
                yield _sse(error.body())
                return
            event = {"type": "transcript.text.done", "text": result.text,
                     "usage": _token_usage(engine, [n_samples], len(result.token_ids)) or
                     {"type": "duration", "seconds": result.duration}}
            if req.logprobs:
                try:
                    event["logprobs"] = logprobs_body(engine, result.token_ids, result.logprobs)
                except ApiError as e:
                    metrics.errors.labels(e.kind).inc()
                    yield _sse(e.body())
                    return
            yield _sse(event)
        finally:
            if not handle.done():
                handle.cancel()
                metrics.errors.labels("client_disconnected").inc()
            metrics.in_progress.dec()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        metrics.in_progress.inc()
        streaming, scores = False, None
        try:
            req = await read_request(request)
            engine = engines[req.model]
            t0 = time.perf_counter()
            wave = await decode(req)
            if req.chunking is not None or len(wave) > settings.long_form_seconds * TARGET_RATE:
                response = await long_form(engine, req, wave, request)
                streaming = isinstance(response, StreamingResponse)  # its generator owns in_progress from here
                return response
            if req.fmt == "verbose_json":  # no_speech_prob: the VAD over the clip, while the engine works
                scores = asyncio.ensure_future(asyncio.to_thread(speech_scores, wave))
            handle, deltas = await submit(engine, wave, t0)
            if req.stream:
                streaming = True  # the generator owns in_progress from here
                return StreamingResponse(sse(engine, req, handle, deltas, len(wave)), media_type="text/event-stream",
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
            score = vad = None
            if scores is not None:
                score, vad = await scores
            if has_timestamps(engine) and req.fmt in ("verbose_json", "srt", "vtt"):  # the model's own timestamps
                segments, words = model_timestamps([(0, len(wave))], [result], score)
                t = LongTranscription(result.text, segments, result.duration, vad or "none")
                body = (verbose_json(t, words, req.granularities) if req.fmt == "verbose_json" else
                        to_srt(t) if req.fmt == "srt" else to_vtt(t))
            else:
                body = format_transcription(req.fmt, result.text, result.duration, result.token_ids, result.logprobs,
                                            None if score is None else no_speech_prob(score, 0, len(wave)))
            if req.logprobs:
                body["logprobs"] = logprobs_body(engine, result.token_ids, result.logprobs)
            if isinstance(body, dict):
                return JSONResponse(body)
            return PlainTextResponse(body, media_type="text/vtt" if req.fmt == "vtt" else "text/plain")
        except ApiError as e:
            return error_response(e)
        finally:
            if scores is not None and not scores.done():  # a request that ended early: its VAD is not needed
                scores.cancel()
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

    add_engine_arguments(parser, repeatable_model=True)
    d = ServerSettings()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                        help=f"the `model` clients pass, one per --model, in order (default: {d.model_name} for "
                             f"the first, the folder or hub name for the others)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                        help="larger uploads get 413 (default: %(default)s)")
    parser.add_argument("--max-audio-seconds", type=float, default=d.max_audio_seconds,
                        help="longer audio gets 413 (default: %(default)s = 3 hours; a decoded hour holds 230 MB)")
    parser.add_argument("--long-form-seconds", type=float, default=d.long_form_seconds,
                        help="longer audio is cut at pauses into segments of at most this long, with timestamps "
                             "(default: %(default)s)")
    parser.add_argument("--long-form-window", type=int, default=None, metavar="N",
                        help="segments of one long-form request in the engine at once (default: a quarter of "
                             "--max-batch-size), so long uploads cannot starve short requests")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to let in-flight requests finish after SIGTERM (default: %(default)s)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' (not on /health, /ready); default: ${API_KEY_ENV}, "
                             f"which other users cannot read in the process list, unlike this flag")


def bind(host: str, port: int):
    """The listening socket, bound before the model loads: a busy port fails in a second, not after a minute."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart may reuse TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(engine, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout: float | None = 300.0, sock=None) -> None:
    """Serve ``engine`` (or a dict {served name: engine}) until SIGINT/SIGTERM; then finish in-flight requests
    (up to ``drain_timeout`` s) and close. uvicorn re-raises the signal afterwards, so the process ends as
    terminated by it (what process managers expect). ``sock``: a socket already bound (``bind``)."""
    import uvicorn

    from .audio import quiet_decoder_logs

    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info")
    restore = quiet_decoder_logs()  # libmpg123 / FFmpeg chatter: counted, not one line per broken frame
    try:
        uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
    finally:
        restore()


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from the ``serve`` arguments; the API key from --api-key, else the environment."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    names = args.served_model_name or [ServerSettings.model_name]
    return ServerSettings(model_name=names[0], max_upload_bytes=int(args.max_upload_mb * 2**20),
                          max_audio_seconds=args.max_audio_seconds, long_form_seconds=args.long_form_seconds,
                          long_form_window=args.long_form_window, api_key=key)


def served_models(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(served name, the arguments of one engine) per ``--model``: ``--served-model-name`` in order, then the
    default name for the first and the last part of the folder or hub id for the others; ``--llm`` once for
    all models or once per model."""
    models = args.model if isinstance(args.model, list) else [args.model]
    models = models or [DEFAULT_MODEL]
    names = list(args.served_model_name or [])
    llms = args.llm if isinstance(args.llm, list) else [args.llm]
    if len(names) > len(models):
        raise ValueError(f"{len(names)} --served-model-name for {len(models)} --model")
    if len(llms) not in (0, 1, len(models)):
        raise ValueError(f"give --llm once (for every model) or once per --model, not {len(llms)} times for "
                         f"{len(models)} models")
    for i in range(len(names), len(models)):
        names.append(_default_name(i, models[i]))
    if len(set(names)) != len(names):
        raise ValueError(f"served model names must differ: {names} (give --served-model-name for each --model)")
    out = []
    for i, (name, model) in enumerate(zip(names, models)):
        ns = argparse.Namespace(**vars(args))
        ns.model, ns.llm = model, (llms[i] if len(llms) == len(models) else (llms or [None])[0])
        out.append((name, ns))
    return out


def _default_name(i: int, model) -> str:
    """The served name of the i-th ``--model`` without ``--served-model-name``: canary-qwen-2.5b for the first,
    unless it is a Parakeet-TDT release (a local one told by its config; a hub id by its name, so that naming
    never downloads), else the last part of its folder, file (less ``.nemo``) or hub id."""
    from .parakeet import is_parakeet

    name = os.path.basename(str(model).rstrip("/\\"))
    local = os.path.exists(os.path.expanduser(str(model)))
    if i == 0 and not (is_parakeet(model) if local else "parakeet" in name.lower()):
        return ServerSettings.model_name
    return name[: -len(".nemo")] if name.endswith(".nemo") else name


def load_engine(args: argparse.Namespace, long_form_seconds: float = TRAINED_MAX_SECONDS):
    """The engine for one ``--model``: a ParakeetEngine for a Parakeet-TDT release (told by its config), else a
    Canary-Qwen Engine with room in max_seq_len for the longest long-form segment."""
    from .engine import Engine
    from .options import engine_kwargs
    from .parakeet import engine_from_args, is_parakeet

    if is_parakeet(args.model):  # no KV cache or token budget; audio past long_form_seconds comes in segments
        return engine_from_args(args)

    kwargs = engine_kwargs(args)
    # 12.5 audio frames per second, the prompt's text and the new tokens
    kwargs["max_seq_len"] = max(kwargs["max_seq_len"], int(long_form_seconds * 12.5) + 64 + kwargs["max_new_tokens"])
    return Engine.from_pretrained(**kwargs)


def run(args: argparse.Namespace) -> int:
    """``canary-trt serve``: the port is bound first, then the models load."""
    from .checks import model_error

    try:
        settings = server_settings(args)
        models = served_models(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e} (is another server running "
              f"there? choose another --port)", file=sys.stderr)
        return 2
    engines = {}
    try:
        for name, ns in models:
            try:
                engines[name] = load_engine(ns, settings.long_form_seconds)
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                print(f"error: {model_error(ns, e)}", file=sys.stderr)
                return 2
    finally:
        if len(engines) < len(models):
            sock.close()
            for e in engines.values():
                e.close()
    serve(engines, settings, args.host, args.port, args.drain_timeout, sock=sock)
    return 0
