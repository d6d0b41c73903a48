"""Faults in a live server under concurrent load: a request whose processing raises (injected) fails alone
with a clear error while the others finish with NeMo's texts; cancelled and failed requests give back their
KV memory, so the engine's counters are all zero once idle; a closed engine refuses requests with 503.
SIGTERM under load: tests/test_server.py::test_sigterm_drains_in_flight_requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the serving extra")
openai = pytest.importorskip("openai", reason="needs the official openai client")

from serving_helpers import TINY, LiveServer, build_engine, golden_text  # noqa: E402
from test_engine import FaultyEncoder, assert_idle_and_clean  # noqa: E402
from test_server import SETTINGS, client, get, metric, server, transcribe, wait_for  # noqa: E402,F401 (fixtures)
from runtime.audio import load_audio  # noqa: E402

ERRORS = "canary_request_errors_total{{kind=\"{}\"}}"
LONG_FRAMES = 60  # audio frames: only a5_numbers (5.9 s, 74 frames) is longer among the fixture utterances




def assert_engine_idle_and_clean(server) -> None:
    """Every counter back to zero: the engine's own, and what /metrics reports of them."""
    engine = server.engine
    wait_for(lambda: engine.scheduler.idle and not engine._inbox, what="the engine to go idle")
    assert_idle_and_clean(engine)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["queued"] == 0
    for gauge in ("canary_kv_blocks_used", "canary_running_sequences", "canary_queue_depth",
                  "canary_requests_in_progress"):
        assert metric(server.url, gauge) == 0, gauge


def test_a_failing_request_fails_alone_while_the_others_finish(server, client):
    """One batch of six: a3_fox fails in the encoder (asked twice, plain and streamed), a5_numbers when handed
    to the decoder; each gets its own clear error, the others their texts. The encoder is held on a first
    request so the six are admitted together and the encoder fault hits a shared batch."""
    engine, gated = server.engine, server.engine.encoder
    real_add = engine.decoder.add

    def add(request):
        if request.audio.shape[0] > LONG_FRAMES:
            raise RuntimeError("injected decoder fault")
        return real_add(request)

    failed = metric(server.url, ERRORS.format("internal_error"))
    engine.encoder = FaultyEncoder(gated, len(load_audio(TINY.audio_path("a3_fox"))))
    engine.decoder.add = add
    gated.gate.clear()
    gated.entered.clear()
    try:
        with ThreadPoolExecutor(7) as pool:
            first = pool.submit(transcribe, client, "a2_morning")
            # The first request is encoded ahead of its admission: the engine is then held inside the encoder.
            wait_for(lambda: gated.entered.is_set(), what="the first request held in the encoder")
            stems = ["a1_yes", "a3_fox", "a3_fox", "a4_stella", "a5_numbers", "a2_morning"]
            futures = [pool.submit(transcribe, client, s, stream=i == 2) for i, s in enumerate(stems)]
            wait_for(lambda: engine.stats()["queued"] == 1 + len(stems), what="six more requests queued")
            gated.gate.set()
            assert first.result(120).text == golden_text("a2_morning")
            for i, (stem, f) in enumerate(zip(stems, futures)):
                if stem == "a3_fox" and i == 2:  # streamed: the error arrives as an event in the stream
                    with pytest.raises(openai.APIError, match="injected encoder fault"):
                        list(f.result(120))
                elif stem in ("a3_fox", "a5_numbers"):
                    with pytest.raises(openai.InternalServerError) as e:
                        f.result(120)
                    word = "encoder" if stem == "a3_fox" else "decoder"
                    assert e.value.status_code == 500 and e.value.body["code"] == "internal_error"
                    assert f"transcription failed: injected {word} fault" in e.value.body["message"]
                else:
                    assert f.result(120).text == golden_text(stem), stem
    finally:
        engine.encoder, engine.decoder.add = gated, real_add
        gated.gate.set()
    assert metric(server.url, ERRORS.format("internal_error")) == failed + 3
    assert_engine_idle_and_clean(server)
    assert transcribe(client, "a5_numbers").text == golden_text("a5_numbers")


def test_cancelled_and_failed_requests_give_back_their_kv_memory(server, client):
    engine = server.engine
    real_step = engine.decoder.step

    # 1. Cancelled mid-stream: decoding is held after the first token, so the request certainly holds KV blocks
    # when its client reads the first delta and goes away.
    decoded, release = threading.Event(), threading.Event()

    def held_step():
        if decoded.is_set():
            release.wait(60)
        out = real_step()
        if out:
            decoded.set()
        return out

    gone = metric(server.url, ERRORS.format("client_disconnected"))
    cancelled = metric(server.url, 'canary_requests_finished_total{reason="cancelled"}')
    engine.decoder.step = held_step
    try:
        with transcribe(client, "a5_numbers", stream=True) as events:
            assert next(iter(events)).type == "transcript.text.delta"
            assert engine.stats()["kv_blocks_used"] > 0 and engine.stats()["running"] == 1
        wait_for(lambda: metric(server.url, ERRORS.format("client_disconnected")) == gone + 1,
                 what="the server to see the client go")
    finally:
        release.set()
        engine.decoder.step = real_step
    wait_for(lambda: metric(server.url, 'canary_requests_finished_total{reason="cancelled"}') == cancelled + 1,
             what="the engine to cancel the request")
    assert_engine_idle_and_clean(server)

    # 2. A decoder step that raises fails the batch it ran (the engine's documented contract), frees its memory
    # and the engine goes on.
    def failing_step():
        engine.decoder.step = real_step  # once
        raise RuntimeError("injected decoder step fault")

    engine.decoder.step = failing_step
    try:
        with pytest.raises(openai.InternalServerError, match="injected decoder step fault"):
            transcribe(client, "a4_stella")
    finally:
        engine.decoder.step = real_step
    assert_engine_idle_and_clean(server)

    # 3. A bad upload never reaches the engine; the server still serves correctly after all of it.
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=SETTINGS.model_name, file=("x.wav", b"RIFF" + bytes(40)))
    assert transcribe(client, "a4_stella").text == golden_text("a4_stella")
    assert_engine_idle_and_clean(server)


def test_a_closed_engine_refuses_requests_with_503():
    server = LiveServer(build_engine(), SETTINGS)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        server.engine.close(30)
        with pytest.raises(openai.APIStatusError) as e:
            transcribe(client, "a1_yes")
        assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
        assert e.value.body["code"] == "shutting_down" and "closing" in e.value.body["message"]
        assert get(server.url + "/health")[0] == 200
    finally:
        server.stop()
