"""OpenAI's transcription parameters against the live server, through the official ``openai`` client: each is
either implemented with a checked effect (include[]=logprobs, chunking_strategy, timestamp_granularities
"segment", verbose_json's avg_logprob / compression_ratio / no_speech_prob / seek, the done event's usage) or
refused with a 400 naming it (prompt, temperature > 0 or out of range, word timestamps, unknown fields); the
model routes, translations, and error messages that name the upload."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="needs the serving extra")
openai = pytest.importorskip("openai", reason="needs the official openai client")

from serving_helpers import TINY, LiveServer, build_engine, golden_text  # noqa: E402
from runtime import longform  # noqa: E402
from runtime.longform import VadSettings, transcribe_long  # noqa: E402
from runtime.server import ServerSettings  # noqa: E402

MODEL = ServerSettings.model_name
SR = 16000


@pytest.fixture(scope="module")
def server():
    s = LiveServer(build_engine(max_batch_size=8), ServerSettings(max_upload_bytes=1 << 20, max_audio_seconds=30.0,
                                                                 long_form_seconds=8.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(client, stem="a3_fox", **kw):
    with TINY.audio_path(stem).open("rb") as f:
        return client.audio.transcriptions.create(model=MODEL, file=f, **kw)


def refused(client, code: str, word: str, stem="a3_fox", **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        create(client, stem, **kw)
    body = e.value.body
    assert e.value.status_code == 400 and body["code"] == code and word in body["message"], body
    return body


def wav_bytes(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def two_utterances() -> np.ndarray:
    """a4_stella, 1.2 s of near silence, a1_yes: ~6 s, under the server's long-form threshold (8 s)."""
    noise = (np.random.default_rng(0).standard_normal(int(1.2 * SR)) * 1e-4).astype(np.float32)
    return np.concatenate([TINY.audio("a4_stella").numpy(), noise, TINY.audio("a1_yes").numpy()])


def test_prompt_is_refused(client):
    refused(client, "unsupported_prompt", "prompt", prompt="Names: Stella, Bob.")


@pytest.mark.parametrize("value, code", [(0.5, "unsupported_temperature"), (1.0, "unsupported_temperature"),
                                         (5, "invalid_temperature"), ("abc", "invalid_temperature"),
                                         (-0.1, "invalid_temperature"), ("nan", "invalid_temperature")])
def test_temperature_is_validated_and_sampling_refused(client, value, code):
    body = refused(client, code, "temperature", temperature=value)
    assert body["param"] == "temperature"


def test_temperature_zero_is_greedy(client):
    assert create(client, temperature=0).text == golden_text("a3_fox")
    assert create(client, temperature="0.0").text == golden_text("a3_fox")


def test_timestamp_granularities(client):
    refused(client, "unsupported_timestamp_granularity", "word timestamps", response_format="verbose_json",
            timestamp_granularities=["word"])
    refused(client, "invalid_timestamp_granularity", "verbose_json", timestamp_granularities=["segment"])
    v = create(client, response_format="verbose_json", timestamp_granularities=["segment"])
    assert v.text == golden_text("a3_fox") and len(v.segments) == 1


def test_unknown_fields_are_refused_not_ignored(client):
    body = refused(client, "unknown_parameter", "known_speaker_names", known_speaker_names=["ann"])
    assert body["param"] == "known_speaker_names"
    refused(client, "invalid_include", "include", include=["segments"])
    refused(client, "invalid_include", "response_format json", include=["logprobs"], response_format="text")


def test_logprobs(server, client):
    """With log-probabilities from the decoder: one {token, logprob, bytes} per generated token, each <= 0,
    whose bytes spell the text; in the stream's done event too. Without them: a 400 that says so."""
    path = TINY.audio_path("a4_stella")
    ref = server.engine.transcribe([path])[0]
    if ref.logprobs is None:
        refused(client, "logprobs_unavailable", "logprobs not available from this decoder", "a4_stella",
                include=["logprobs"])
        return
    r = create(client, "a4_stella", include=["logprobs"])
    assert r.text == ref.text == golden_text("a4_stella")
    assert len(r.logprobs) == len(ref.token_ids) == len(ref.logprobs)
    assert [lp.logprob for lp in r.logprobs] == pytest.approx(ref.logprobs, abs=1e-6)
    assert all(lp.logprob <= 0 for lp in r.logprobs)
    assert b"".join(bytes(int(b) for b in lp.bytes) for lp in r.logprobs).decode("utf-8").strip() == r.text
    done = list(create(client, "a4_stella", include=["logprobs"], stream=True))[-1]
    assert done.type == "transcript.text.done" and len(done.logprobs) == len(ref.token_ids)


def test_verbose_json_segment_fields(server, client):
    """Every field OpenAI marks required, computed: compression_ratio as Whisper's (bytes / zlib bytes),
    avg_logprob as the mean token log-probability (None only without them), no_speech_prob from the VAD, seek
    in 10 ms frames of the start."""
    v = create(client, "a4_stella", response_format="verbose_json")
    [seg] = v.segments
    data = v.text.encode()
    assert seg.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)), abs=1e-4)
    ref = server.engine.transcribe([TINY.audio_path("a4_stella")])[0]
    if ref.logprobs is None:
        assert seg.avg_logprob is None
    else:
        assert seg.avg_logprob == pytest.approx(float(np.mean(ref.logprobs)), abs=1e-5) and seg.avg_logprob <= 0
    assert seg.seek == 0 and seg.temperature == 0.0
    assert 0.0 <= seg.no_speech_prob <= 1.0
    score, _ = longform.speech_scores(TINY.audio("a4_stella").numpy())
    assert seg.no_speech_prob == pytest.approx(longform.no_speech_prob(score, 0, len(score) * 512), abs=1e-4)
    if longform.silero_available():  # silero's probabilities: speech is speech, quiet noise is not
        assert seg.no_speech_prob < 0.5
        quiet = (np.random.default_rng(1).standard_normal(3 * SR) * 1e-3).astype(np.float32)
        q = client.audio.transcriptions.create(model=MODEL, file=("quiet.wav", wav_bytes(quiet)),
                                               response_format="verbose_json")
        assert q.segments[0].no_speech_prob > 0.6


def test_chunking_strategy_segments_with_its_settings(server, client):
    """Short audio is one segment unless chunking_strategy asks for VAD cuts: then every speech span the VAD
    finds with those settings is a segment, as offline long-form transcription with the same settings gives:
    "auto" cuts at the pause; a server_vad silence_duration_ms longer than the pause keeps both utterances in
    one segment. Bad settings are a 400."""
    wave = two_utterances()
    data = wav_bytes(wave)
    engine = server.engine

    def post(**kw):
        return client.audio.transcriptions.create(model=MODEL, file=("two.wav", data), response_format="verbose_json",
                                                  **kw)

    assert len(post().segments) == 1
    for strategy, settings in [("auto", VadSettings()),
                               ({"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 100,
                                 "silence_duration_ms": 0}, VadSettings(0.5, 0.1, 0.0)),
                               ({"type": "server_vad", "silence_duration_ms": 3000}, VadSettings(0.5, 0.3, 3.0))]:
        ref = transcribe_long(engine, wave, SR, max_segment_s=8.0, settings=settings, group=False)
        got = post(chunking_strategy=strategy)
        assert [(s.start, s.end, s.text) for s in got.segments] == [(s.start, s.end, s.text) for s in ref.segments]
        assert [s.seek for s in got.segments] == [round(s.start * 100) for s in ref.segments]
        assert got.text == ref.text
        assert len(ref.segments) == (1 if settings.min_silence_s == 3.0 else 2), strategy
    for bad in ({"type": "server_vad", "threshold": 2}, {"type": "semantic"}, "sometimes",
                {"type": "server_vad", "prefix_padding_ms": -1}):
        with pytest.raises(openai.BadRequestError) as e:
            post(chunking_strategy=bad)
        assert e.value.body["param"] == "chunking_strategy" or e.value.body["param"] in ("threshold",
                                                                                       "prefix_padding_ms")


def test_done_event_carries_token_usage(server, client):
    engine = server.engine
    *deltas, done = create(client, "a2_morning", stream=True)
    ref = engine.transcribe([TINY.audio_path("a2_morning")])[0]
    ids = engine.tokenizer.prompt_ids(engine.options.prompt)
    prompt = engine.prompt_tokens(len(TINY.audio("a2_morning")), ids)
    assert done.usage.type == "tokens" and done.usage.output_tokens == len(ref.token_ids)
    assert done.usage.input_tokens == prompt and done.usage.total_tokens == prompt + len(ref.token_ids)


def test_model_routes_and_translations(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("whisper-1")
    assert e.value.body["code"] == "model_not_found"
    with TINY.audio_path("a1_yes").open("rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.audio.translations.create(model=MODEL, file=f)
    assert "this model transcribes English; it does not translate" in e.value.body["message"]


def test_upload_errors_name_the_file(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model=MODEL, file=("meeting-notes.mp3", b"not audio at all " * 50))
    message = e.value.body["message"]
    assert "meeting-notes.mp3" in message and "BytesIO" not in message and " at 0x" not in message, message
