"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client: every response
format, streaming, concurrency against offline transcription, bad inputs, limits, back-pressure, client
disconnects, metrics and SIGTERM draining."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="needs the serving extra")
openai = pytest.importorskip("openai", reason="needs the official openai client")

from serving_helpers import GATE_ENV, TINY, LiveServer, build_engine, encode_audio, golden_text  # noqa: E402
from runtime.server import ServerSettings  # noqa: E402

MODEL = ServerSettings.model_name
SETTINGS = ServerSettings(max_upload_bytes=1 << 20, max_audio_seconds=10.0, long_form_seconds=8.0)


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(url: str, name: str) -> float:
    """One sample of /metrics (0 when the labelled series does not exist yet)."""
    for line in get(url + "/metrics")[1].splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server():
    s = LiveServer(build_engine(max_batch_size=8), SETTINGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def transcribe(client, stem: str, **kw):
    with TINY.audio_path(stem).open("rb") as f:
        return client.audio.transcriptions.create(model=MODEL, file=f, **kw)


def assert_serves_correctly(client):
    assert transcribe(client, "a4_stella").text == golden_text("a4_stella")


def test_offline_reference_matches_goldens(server):
    """The reference the concurrency test compares with: the engine alone gives NeMo's texts."""
    results = server.engine.transcribe([TINY.audio_path(s) for s in TINY.stems])
    assert [r.text for r in results] == [golden_text(s) for s in TINY.stems]


def test_every_response_format(client):
    stem = "a3_fox"
    text, seconds = golden_text(stem), TINY.meta["audio_files"][2]["duration_s"]
    r = transcribe(client, stem)
    assert r.text == text and r.usage.seconds == pytest.approx(seconds)
    assert transcribe(client, stem, response_format="text") == text + "\n"
    v = transcribe(client, stem, response_format="verbose_json")
    assert v.text == text and v.duration == pytest.approx(seconds) and v.language == "english"
    assert len(v.segments) == 1 and v.segments[0].end == pytest.approx(seconds) and v.segments[0].text == text
    ids = TINY.tensors[f"single.{stem}.gen_ids"].tolist()
    assert v.segments[0].tokens == ids  # this utterance hits max_new_tokens, so no end-of-turn id to drop
    assert transcribe(client, stem, response_format="srt") == f"1\n00:00:00,000 --> 00:00:02,725\n{text}\n\n"
    assert transcribe(client, stem, response_format="vtt") == f"WEBVTT\n\n00:00:00.000 --> 00:00:02.725\n{text}\n\n"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_streaming_events(client):
    for stem in ("a4_stella", "a1_yes"):
        events = list(transcribe(client, stem, stream=True))
        *deltas, done = events
        assert done.type == "transcript.text.done" and done.text == golden_text(stem)
        assert deltas and all(e.type == "transcript.text.delta" for e in deltas)
        assert "".join(e.delta for e in deltas) == done.text


def test_other_containers(client):
    """m4a/aac and webm/opus (FFmpeg through PyAV) and flac (libsndfile) all decode and transcribe."""
    pytest.importorskip("av", reason="PyAV decodes m4a and webm")
    wave, rate = sf.read(str(TINY.audio_path("a1_yes")), dtype="float32")
    for name, data in [("x.m4a", encode_audio(wave, rate, "ipod", "aac", 16000)),
                       ("x.webm", encode_audio(wave, rate, "webm", "libopus", 48000))]:
        r = client.audio.transcriptions.create(model=MODEL, file=(name, data), response_format="verbose_json")
        assert abs(r.duration - len(wave) / rate) < 0.15, name  # whole, plus AAC priming / frame padding
    import io

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="FLAC")
    assert client.audio.transcriptions.create(model=MODEL, file=("x.flac", buf.getvalue())).text == golden_text("a1_yes")


def test_concurrent_requests_equal_offline_transcription(server, client):
    stems = [TINY.stems[i % len(TINY.stems)] for i in range(40)]
    offline = {r_stem: r.text for r_stem, r in zip(TINY.stems, server.engine.transcribe(
        [TINY.audio_path(s) for s in TINY.stems]))}

    def one(i):
        stem = stems[i]
        if i % 3 == 0:  # a third of them streamed
            return stem, [e for e in transcribe(client, stem, stream=True)][-1].text
        return stem, transcribe(client, stem).text

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(len(stems))))
    assert [text for _, text in results] == [offline[stem] for stem, _ in results]
    wait_for(lambda: server.engine.stats()["running"] == 0, what="engine idle")


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "wrong_field", "wrong_model", "bad_format",
                                  "oversize_upload", "too_long_audio"])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, case):
    wav = TINY.audio_path("a2_morning").read_bytes()
    status, code, word = {
        "garbage": (400, "invalid_audio", "cannot decode audio"),
        "empty": (400, "invalid_audio", "empty upload"),
        "truncated": (400, "invalid_audio", "cannot decode audio"),
        "wrong_field": (400, "missing_file", "'file'"),
        "wrong_model": (404, "model_not_found", "whisper-1"),
        "bad_format": (400, "invalid_response_format", "response_format"),
        "oversize_upload": (413, "upload_too_large", "1048576 bytes"),
        "too_long_audio": (413, "audio_too_long", "limit of 10 s"),
    }[case]
    with pytest.raises(openai.APIStatusError) as e:
        if case == "wrong_field":  # the audio sent under another name: the raw client lets us misname it
            client.post("/audio/transcriptions", cast_to=object,
                        options={"headers": {"Content-Type": "multipart/form-data"}},
                        files=[("audio", ("x.wav", wav))], body={"model": MODEL})
        else:
            data = {"garbage": b"this is not audio at all" * 40, "empty": b"", "truncated": wav[:40],  # cut inside the header
                    "oversize_upload": b"\0" * (SETTINGS.max_upload_bytes + 1),
                    "too_long_audio": _long_wav(12.0)}.get(case, wav)
            client.audio.transcriptions.create(
                model="whisper-1" if case == "wrong_model" else MODEL, file=("speech.wav", data),
                response_format="mp4" if case == "bad_format" else "json")
    err = e.value
    assert err.status_code == status
    assert err.body["code"] == code and word in err.body["message"], err.body
    assert set(err.body) == {"message", "type", "param", "code"}
    assert metric(server.url, f'canary_request_errors_total{{kind="{code}"}}') >= 1
    assert_serves_correctly(client)


def _long_wav(seconds: float) -> bytes:
    import io

    wave, rate = sf.read(str(TINY.audio_path("a5_numbers")), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, np.tile(wave, int(seconds * rate / len(wave)) + 1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_request(server, stream):
    """The encoder is held so the request is certainly in flight when the client goes away; once released, the
    engine finishes it as cancelled and every counter returns to zero."""
    engine = server.engine
    cancelled = metric(server.url, 'canary_requests_finished_total{reason="cancelled"}')
    gone = metric(server.url, 'canary_request_errors_total{kind="client_disconnected"}')
    engine.encoder.gate.clear()
    try:
        impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1.0)
        with pytest.raises(Exception, match="(?i)timed? ?out"):  # then the client closes the connection
            if stream:
                with transcribe(impatient, "a5_numbers", stream=True) as events:
                    list(events)
            else:
                transcribe(impatient, "a5_numbers")
        impatient.close()
        if not stream:  # the server notices at once; a stream's generator notices when Starlette cancels it
            wait_for(lambda: metric(server.url, 'canary_request_errors_total{kind="client_disconnected"}') > gone,
                     what="the server to see the disconnect")
    finally:
        engine.encoder.gate.set()
    wait_for(lambda: metric(server.url, 'canary_requests_finished_total{reason="cancelled"}') > cancelled,
             what="the engine to cancel the request")
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["queued"] == 0, what="engine idle")
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["waiting"] == 0
    assert metric(server.url, "canary_requests_in_progress") == 0
    assert metric(server.url, 'canary_request_errors_total{kind="client_disconnected"}') == gone + 1


def test_health_ready_and_metrics(server, client):
    assert get(server.url + "/health") == (200, json.dumps({"status": "ok"}, separators=(",", ":")))
    status, body = get(server.url + "/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    tokens, audio = metric(server.url, "canary_generated_tokens_total"), metric(server.url, "canary_audio_seconds_total")
    latency = metric(server.url, "canary_request_latency_seconds_count")
    r = transcribe(client, "a3_fox", response_format="verbose_json")
    assert metric(server.url, "canary_generated_tokens_total") == tokens + len(r.segments[0].tokens)
    assert metric(server.url, "canary_audio_seconds_total") == pytest.approx(audio + r.duration)
    assert metric(server.url, "canary_request_latency_seconds_count") == latency + 1
    text = get(server.url + "/metrics")[1]
    for name in ("canary_queue_depth", "canary_running_sequences", "canary_time_to_first_token_seconds_bucket",
                 "canary_kv_blocks_used"):
        assert name in text
    status, body = get(server.url + "/no/such/route")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_queue_full_gets_429_with_retry_after():
    """max_queue=2 and the encoder held: one request is taken by the encoder (and held there, still queued:
    the engine encodes ahead of admission), one more waits, the third is refused; after release both accepted
    ones complete correctly."""
    server = LiveServer(build_engine(max_queue=2), SETTINGS)
    try:
        engine = server.engine
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        engine.encoder.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(transcribe, client, "a2_morning")]
            wait_for(lambda: engine.stats()["queued"] == 1, what="the first request in the (held) encoder")
            futures += [pool.submit(transcribe, client, "a1_yes")]
            wait_for(lambda: engine.stats()["queued"] == 2, what="two queued requests")
            with pytest.raises(openai.RateLimitError) as e:
                transcribe(client, "a3_fox")
            assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "1"
            assert e.value.body["code"] == "queue_full"
            engine.encoder.gate.set()
            assert [f.result(120).text for f in futures] == [golden_text("a2_morning"), golden_text("a1_yes")]
    finally:
        engine.encoder.gate.set()
        server.stop()


def test_sigterm_drains_in_flight_requests(tmp_path):
    """A server process gets SIGTERM while eight requests, plain and streamed, are held in flight: it stops
    accepting connections (a new request is refused at connect: uvicorn closes the listening socket before the
    app could answer it), finishes every accepted request correctly, then exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gate = tmp_path / "gate"
    gate.touch()
    env = {**os.environ, GATE_ENV: str(gate), "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "serving_helpers.py"), str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url), timeout=120, what="the server process")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stems = ["a1_yes", "a3_fox", "a4_stella", "a2_morning"] * 2
        with ThreadPoolExecutor(len(stems)) as pool:
            futures = [pool.submit(transcribe, client, s, stream=i % 2 == 1) for i, s in enumerate(stems)]
            wait_for(lambda: metric(url, "canary_requests_in_progress") == len(stems), what="requests in flight")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not _reachable(url), what="the listening socket to close")
            with pytest.raises(openai.APIConnectionError):
                transcribe(client, "a1_yes")
            assert proc.poll() is None  # still draining: the held requests have not finished
            gate.unlink()
            results = [f.result(120) for f in futures]
        texts = [r.text if i % 2 == 0 else list(r)[-1].text for i, r in enumerate(results)]
        assert texts == [golden_text(s) for s in stems]
        # uvicorn re-raises the signal once drained, so the process ends as terminated by SIGTERM
        assert proc.wait(60) == -signal.SIGTERM
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _reachable(url: str) -> bool:
    try:
        return get(url + "/health")[0] == 200
    except OSError:
        return False


def test_cli_hooks_parse_into_engine_and_server_settings():
    import argparse

    from runtime.options import engine_kwargs
    from runtime.server import DEFAULT_MAX_AUDIO_SECONDS, add_arguments, served_models, server_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--max-queue", "3", "--engine-dir", "build/dec", "--port", "9000",
                              "--no-cuda-graphs", "--max-audio-seconds", "12"])
    [(name, one)] = served_models(args)
    kw = engine_kwargs(one)
    assert name == ServerSettings.model_name
    assert kw["model"] == "m" and kw["max_queue"] == 3 and kw["cuda_graphs"] is False
    assert kw["decoder"] == "trtllm" and kw["decoder_dir"] == "build/dec"
    assert (args.host, args.port, args.max_audio_seconds) == ("127.0.0.1", 9000, 12.0)
    defaults = parser.parse_args([])
    assert "decoder" not in engine_kwargs(served_models(defaults)[0][1])
    # long audio is accepted by default (3 hours), long-form past 40 s
    assert server_settings(defaults).max_audio_seconds == DEFAULT_MAX_AUDIO_SECONDS == 3 * 3600
    assert server_settings(defaults).long_form_seconds == 40.0
    # several models, each with its served name and its own or a shared --llm
    two = parser.parse_args(["--model", "a/canary", "--model", "/m/other/", "--served-model-name", "first",
                             "--llm", "L"])
    assert [(n, ns.model, ns.llm) for n, ns in served_models(two)] == [("first", "a/canary", "L"),
                                                                       ("other", "/m/other/", "L")]
    for bad in (["--model", "a", "--model", "b", "--llm", "1", "--llm", "2", "--llm", "3"],
                ["--model", "x/a", "--model", "y/a", "--model", "z/a"], ["--served-model-name", "a", "--served-model-name", "b"]):
        with pytest.raises(ValueError):
            served_models(parser.parse_args(bad))


def test_long_audio_is_transcribed_long_form_with_timestamps(server, client):
    """Audio past long_form_seconds (8 s here) is cut at its pause into segments: the answers equal the
    offline long-form transcription of the same samples, in every format."""
    import io

    from runtime.api import CanaryQwen
    from runtime.longform import to_srt, to_vtt, transcribe_long

    speech = sf.read(str(TINY.audio_path("a4_stella")), dtype="float32")[0]  # 4.06 s
    wave = np.concatenate([speech, np.zeros(16000, np.float32), speech, np.zeros(8000, np.float32)])  # 9.6 s
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    data = buf.getvalue()
    engine = server.engine
    ref = transcribe_long(CanaryQwen(engine.model, engine.tokenizer), wave, 16000, max_segment_s=8.0,
                          max_new_tokens=engine.options.max_new_tokens)
    assert len(ref.segments) >= 2 and all(s.end - s.start <= 8.0 for s in ref.segments)
    create = client.audio.transcriptions.create
    assert create(model=MODEL, file=("long.wav", data)).text == ref.text
    assert create(model=MODEL, file=("long.wav", data), response_format="srt") == to_srt(ref)
    assert create(model=MODEL, file=("long.wav", data), response_format="vtt") == to_vtt(ref)
    verbose = create(model=MODEL, file=("long.wav", data), response_format="verbose_json")
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(s.start, s.end, s.text) for s in ref.segments]
    for got, want in zip(verbose.segments, ref.segments):  # the fields OpenAI clients filter on, per segment
        assert got.seek == round(want.start * 100) and got.no_speech_prob == want.no_speech_prob
        assert got.avg_logprob == (None if want.logprobs is None else pytest.approx(np.mean(want.logprobs), abs=1e-5))
        assert isinstance(got.compression_ratio, float) and got.temperature == 0.0
    if all(s.logprobs is not None for s in ref.segments):  # include[]=logprobs: every segment's tokens, in order
        lp = create(model=MODEL, file=("long.wav", data), include=["logprobs"]).logprobs
        assert [x.logprob for x in lp] == pytest.approx([x for s in ref.segments for x in s.logprobs], abs=1e-5)
    events = list(create(model=MODEL, file=("long.wav", data), stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == ref.text
    assert "".join(e.delta for e in events[:-1]) == ref.text  # no trailing space the text lacks


def _speech_with_pauses(copies: int) -> np.ndarray:
    """The fixture's utterances ``copies`` times over, 1 s of quiet noise between them."""
    noise = (np.random.default_rng(0).standard_normal(16000) * 1e-4).astype(np.float32)
    parts = []
    for stem in TINY.stems * copies:
        parts += [TINY.audio(stem).numpy(), noise]
    return np.concatenate(parts)


def _wav(wave: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _post_raw(url: str, data: bytes, fields: dict):
    """Start a multipart transcription request on a connection of our own (to abandon it at will)."""
    import http.client

    from runtime.bench_serve import multipart

    body, ctype = multipart(fields, "long.wav", data)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": ctype})
    return conn


def test_abandoned_long_form_request_is_cancelled_and_short_ones_are_not_starved():
    """A long-form request may hold at most `long_form_window` (2) segments in the engine: with the encoder
    held, the engine's queue holds its two segments and then the three short requests that arrive, while the
    rest of its segments wait in the server. The client then goes away: every segment is cancelled, queued or
    running, none of the waiting ones is ever submitted, the short requests complete correctly, and every
    counter comes back to zero."""
    from runtime.longform import plan_segments

    settings = ServerSettings(max_upload_bytes=4 << 20, max_audio_seconds=120, long_form_seconds=8.0,
                              long_form_window=2)
    server = LiveServer(build_engine(max_batch_size=8), settings)
    engine, url = server.engine, server.url
    try:
        wave = _speech_with_pauses(2)  # ~38 s
        n = len(plan_segments(wave, 8.0)[0])
        assert n >= 4
        engine.encoder.gate.clear()
        conn = _post_raw(url, _wav(wave), {"model": MODEL, "response_format": "json"})
        wait_for(lambda: metric(url, "canary_long_form_segments_in_flight") == 2, what="two segments submitted")
        assert metric(url, "canary_long_form_segments_waiting") == n - 2
        assert engine.stats()["queued"] == 2
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            shorts = [pool.submit(transcribe, client, stem) for stem in ("a1_yes", "a3_fox", "a2_morning")]
            wait_for(lambda: engine.stats()["queued"] == 5, what="the short requests queued")
            # fairness: the short requests wait behind 2 of the long request's segments, not behind all n
            assert metric(url, "canary_long_form_segments_waiting") == n - 2
            conn.sock.shutdown(socket.SHUT_RDWR)  # the long-form client goes away
            conn.close()
            wait_for(lambda: metric(url, "canary_long_form_segments_waiting") == 0, what="the remaining segments dropped")
            engine.encoder.gate.set()
            assert [f.result(120).text for f in shorts] == [golden_text(s) for s in ("a1_yes", "a3_fox", "a2_morning")]
        wait_for(lambda: metric(url, "canary_long_form_requests") == 0, what="the long-form run to end")
        assert metric(url, 'canary_long_form_segments_finished_total{reason="cancelled"}') == 2
        assert sum(metric(url, f'canary_long_form_segments_finished_total{{reason="{r}"}}')
                   for r in ("stop", "length")) == 0  # nothing past the window was ever transcribed
        assert metric(url, 'canary_request_errors_total{kind="client_disconnected"}') == 1
        wait_for(lambda: engine.stats()["queued"] == 0 and engine.stats()["running"] == 0, what="engine idle")
        assert engine.stats()["kv_blocks_used"] == 0
        for name in ("canary_long_form_segments_in_flight", "canary_long_form_segments_waiting",
                     "canary_requests_in_progress", "canary_queue_depth", "canary_running_sequences"):
            assert metric(url, name) == 0, name
    finally:
        engine.encoder.gate.set()
        server.stop()


def test_long_form_stream_sends_each_segment_once_it_and_those_before_are_done():
    """With one segment in the engine at a time and the encoder held from the second segment on, the first
    segment's text must arrive while the rest are not even encoded; the deltas, in order, are the segments'
    texts with the separating space leading, and join to exactly the final text."""
    from runtime.api import CanaryQwen
    from runtime.longform import transcribe_long

    settings = ServerSettings(max_upload_bytes=4 << 20, max_audio_seconds=120, long_form_seconds=8.0,
                              long_form_window=1)
    server = LiveServer(build_engine(max_batch_size=8), settings)
    engine = server.engine
    calls, release = [], threading.Event()
    inner = engine.encoder.encode

    def encode(audio):  # the first segment is encoded; later ones wait for `release`
        if len(audio):  # (the engine may call with nothing to encode)
            calls.append(len(audio))
        if len(calls) > 1:
            release.wait(120)
        return inner(audio)

    engine.encoder.encode = encode
    try:
        wave = _speech_with_pauses(1)  # ~19 s: several segments
        ref = transcribe_long(CanaryQwen(engine.model, engine.tokenizer), wave, 16000, max_segment_s=8.0,
                              max_new_tokens=engine.options.max_new_tokens)
        texts = [s.text for s in ref.segments if s.text]
        assert len(ref.segments) >= 2 and len(texts) >= 2
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        events = client.audio.transcriptions.create(model=MODEL, file=("long.wav", _wav(wave)), stream=True)
        stream = iter(events)
        first = next(stream)
        assert first.type == "transcript.text.delta" and first.delta == texts[0]
        assert metric(server.url, "canary_long_form_segments_waiting") >= 1  # the rest not yet transcribed
        release.set()
        rest = list(stream)
        *deltas, done = [first, *rest]
        assert [d.delta for d in deltas] == [texts[0]] + [" " + t for t in texts[1:]]
        assert "".join(d.delta for d in deltas) == done.text == ref.text
        assert done.usage.output_tokens == sum(len(s.token_ids) for s in ref.segments)
    finally:
        release.set()
        server.stop()


def test_several_models_in_one_process():
    """Two engines under two served names: /v1/models lists both, /v1/models/{id} finds each, and each request
    runs on the engine its `model` names (the other engine takes no step); no `model` means the first."""
    engines = {"canary-a": build_engine(), "canary-b": build_engine()}
    server = LiveServer(engines, SETTINGS)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["canary-a", "canary-b"]
        assert client.models.retrieve("canary-b").id == "canary-b"
        for name in ("canary-b", "canary-a", "canary-b"):
            steps = {n: e.stats()["steps"] for n, e in engines.items()}
            with TINY.audio_path("a3_fox").open("rb") as f:
                assert client.audio.transcriptions.create(model=name, file=f).text == golden_text("a3_fox")
            other = next(n for n in engines if n != name)
            assert engines[name].stats()["steps"] > steps[name] and engines[other].stats()["steps"] == steps[other]
        with pytest.raises(openai.NotFoundError):
            transcribe(client, "a1_yes")  # MODEL is not served here
    finally:
        server.stop()
