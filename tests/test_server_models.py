"""Canary-Qwen and Parakeet-TDT served side by side by one server, driven by the official ``openai`` client: each
request goes to the engine its ``model`` names and gets that model's answer (Canary-Qwen: the tiny-canary-qwen
NeMo goldens; Parakeet-TDT: the tdt-tiny goldens of NeMo's ``transcribe(timestamps=True)``, texts and word and
segment timestamps), mixed and concurrent; Parakeet's verbose_json words and segments, long-form with the
segment offsets added (equal to ``ParakeetEngine.transcribe_long``), srt/vtt from its timestamps; word timestamps
refused for Canary-Qwen, logprobs for Parakeet-TDT; ``serve``'s loader telling the families apart."""

from __future__ import annotations

import argparse
import io
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi", reason="needs the serving extra")
openai = pytest.importorskip("openai", reason="needs the official openai client")

from serving_helpers import TINY, LiveServer, build_engine, build_parakeet, golden_text  # noqa: E402
from test_parakeet import NEMO, ROOT, utterances  # noqa: E402
from runtime import longform  # noqa: E402
from runtime.server import ServerSettings  # noqa: E402

CANARY, PARAKEET = "canary-qwen-2.5b", "parakeet-tdt"
SR = 16000
SETTINGS = ServerSettings(max_upload_bytes=1 << 20, max_audio_seconds=30.0, long_form_seconds=9.0)


@pytest.fixture(scope="module")
def server():
    s = LiveServer({CANARY: build_engine(max_batch_size=8), PARAKEET: build_parakeet(max_batch_size=8)}, SETTINGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def utt(i: int) -> dict:
    return utterances()[i]


def golden(u: dict) -> dict:
    return u["transcribe_single_timestamps"]


def parakeet(client, u: dict, **kw):
    with (ROOT / u["file"]).open("rb") as f:
        return client.audio.transcriptions.create(model=PARAKEET, file=f, **kw)


def canary(client, stem: str, **kw):
    with TINY.audio_path(stem).open("rb") as f:
        return client.audio.transcriptions.create(model=CANARY, file=f, **kw)


def wav_bytes(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def times(items, key: str) -> list[tuple]:
    """(text, start, end) of words or segments, the times to the millisecond (the server rounds to it)."""
    get = (lambda x, k: x[k]) if isinstance(items[0], dict) else (lambda x, k: getattr(x, k))
    return [(get(x, key), round(get(x, "start"), 3), round(get(x, "end"), 3)) for x in items]


def test_models_listed_and_each_engine_reported(server, client):
    assert [m.id for m in client.models.list()] == [CANARY, PARAKEET]
    assert client.models.retrieve(PARAKEET).id == PARAKEET
    with urllib.request.urlopen(server.url + "/ready", timeout=30) as r:
        ready = json.loads(r.read())
    assert ready["models"] == [CANARY, PARAKEET] and ready["queued"] == 0 and ready["running"] == 0
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert "canary_queue_depth 0.0" in metrics and "canary_running_sequences 0.0" in metrics


def test_mixed_concurrent_requests_each_get_their_own_models_answer(server, client):
    stems, utts = TINY.stems, utterances()

    def one(i):
        if i % 2:  # Canary-Qwen: json, or a stream
            stem = stems[i // 2 % len(stems)]
            if i % 4 == 1:
                return "canary", stem, canary(client, stem).text, None
            return "canary", stem, list(canary(client, stem, stream=True))[-1].text, None
        u = utts[i // 2 % len(utts)]
        if i % 4 == 0:  # Parakeet-TDT: verbose_json with words, or a stream
            v = parakeet(client, u, response_format="verbose_json", timestamp_granularities=["word"])
            return "parakeet", u["file"], v.text, times(v.words, "word")
        return "parakeet", u["file"], list(parakeet(client, u, stream=True))[-1].text, None

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(40)))
    by_file = {u["file"]: u for u in utts}
    for family, key, text, words in results:
        if family == "canary":
            assert text == golden_text(key), key
        else:
            assert text == golden(by_file[key])["text"], key
            if words is not None:
                assert words == times(golden(by_file[key])["word"], "word"), key
    assert {f for f, *_ in results} == {"canary", "parakeet"}


def test_parakeet_verbose_json_words_and_segments(client):
    for u in utterances():
        ts = golden(u)
        v = parakeet(client, u, response_format="verbose_json", timestamp_granularities=["word", "segment"])
        assert v.text == ts["text"] and v.duration == pytest.approx(u["duration_s"])
        assert times(v.words, "word") == times(ts["word"], "word")
        assert times(v.segments, "text") == times(ts["segment"], "segment")
        # each token in exactly one segment, in order; the fields OpenAI marks required
        assert [t for s in v.segments for t in s.tokens] == ts["token_ids"]
        for s in v.segments:
            assert s.seek == round(s.start * 100) and s.temperature == 0.0 and s.avg_logprob is None
            assert s.compression_ratio > 0 and 0.0 <= s.no_speech_prob <= 1.0
    u = utt(2)  # two segments
    words_only = parakeet(client, u, response_format="verbose_json", timestamp_granularities=["word"])
    assert words_only.segments is None and times(words_only.words, "word") == times(golden(u)["word"], "word")
    default = parakeet(client, u, response_format="verbose_json")  # OpenAI's default granularity: segment
    assert default.words is None and len(default.segments) == len(golden(u)["segment"]) == 2


def test_parakeet_srt_and_vtt_use_the_models_timestamps(client):
    u = utt(2)
    segs = golden(u)["segment"]
    cues = [(longform.timestamp(s["start"], ","), longform.timestamp(s["end"], ","), s["segment"]) for s in segs]
    assert parakeet(client, u, response_format="srt") == "".join(
        f"{n}\n{a} --> {b}\n{text}\n\n" for n, (a, b, text) in enumerate(cues, 1))
    assert parakeet(client, u, response_format="vtt") == "WEBVTT\n\n" + "".join(
        f"{a.replace(',', '.')} --> {b.replace(',', '.')}\n{text}\n\n" for a, b, text in cues)
    assert cues[1][0] == "00:00:00,720"  # the second sentence starts mid-file, as NeMo says


def long_wave() -> np.ndarray:
    """Three tdt-tiny utterances with a second of silence between them: 13.3 s, past long_form_seconds (9 s; the longest tdt-tiny clip is 8.1 s)."""
    pause = np.zeros(SR, np.float32)
    parts = []
    for i in (4, 2, 3):
        parts += [sf.read(str(ROOT / utt(i)["file"]), dtype="float32")[0], pause]
    return np.concatenate(parts[:-1])


def test_parakeet_long_form_adds_the_segment_offsets(server, client):
    """Audio past long_form_seconds is cut at pauses and each piece transcribed alone: the words and segments,
    offset into the whole file, equal ParakeetEngine.transcribe_long's (its own implementation of the offsets,
    on the same cuts)."""
    wave = long_wave()
    cuts, _ = longform.plan_segments(wave, SETTINGS.long_form_seconds)
    assert len(cuts) >= 2 and cuts[1][0] > 0  # the later pieces' offsets are what is checked
    expected, words = server.engine[PARAKEET].transcribe_long(wave, SR, max_segment_s=SETTINGS.long_form_seconds)
    v = client.audio.transcriptions.create(model=PARAKEET, file=("long.wav", wav_bytes(wave)),
                                           response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert v.duration == pytest.approx(len(wave) / SR)
    assert times(v.words, "word") == times(words, "word")
    assert times(v.segments, "text") == times([s.__dict__ for s in expected.segments], "text")
    assert [s.tokens for s in v.segments] == [s.token_ids for s in expected.segments]
    assert max(w.start for w in v.words) > cuts[1][0] / SR  # words from the later pieces, shifted
    srt = client.audio.transcriptions.create(model=PARAKEET, file=("long.wav", wav_bytes(wave)), response_format="srt")
    assert srt == longform.to_srt(expected)
    *deltas, done = client.audio.transcriptions.create(model=PARAKEET, file=("long.wav", wav_bytes(wave)),
                                                       stream=True)
    assert "".join(d.delta for d in deltas) == done.text == v.text
    assert done.text.split() == expected.text.split()


def test_parameters_a_model_cannot_honour_are_refused_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        canary(client, "a3_fox", response_format="verbose_json", timestamp_granularities=["word"])
    body = e.value.body
    assert body["code"] == "unsupported_timestamp_granularity" and body["param"] == "timestamp_granularities"
    assert "word timestamps" in body["message"] and CANARY in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        parakeet(client, utt(1), include=["logprobs"])
    body = e.value.body
    assert body["code"] == "logprobs_unavailable" and body["param"] == "include" and PARAKEET in body["message"]
    # the same parameters each model does honour still work
    assert canary(client, "a3_fox", include=["logprobs"]).logprobs
    assert parakeet(client, utt(1), response_format="verbose_json", timestamp_granularities=["word"]).words


def test_a_bad_parakeet_upload_fails_alone(client):
    def one(i):
        if i % 3 == 0:
            try:
                client.audio.transcriptions.create(model=PARAKEET, file=("broken.wav", b"RIFF not really a wav"))
            except openai.BadRequestError as e:
                return "bad", e.body
            return "bad", None
        if i % 3 == 1:
            return "parakeet", parakeet(client, utt(3)).text
        return "canary", canary(client, "a1_yes").text

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, range(9)))
    for kind, answer in results:
        if kind == "bad":
            assert answer is not None and answer["code"] == "invalid_audio" and "broken.wav" in answer["message"]
        else:
            assert answer == (golden(utt(3))["text"] if kind == "parakeet" else golden_text("a1_yes"))


def test_serve_loads_each_model_by_its_family():
    from runtime.engine import Engine
    from runtime.parakeet import ParakeetEngine
    from runtime.server import add_arguments, load_engine, served_models

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(TINY.root / "model"), "--model", str(NEMO), "--llm",
                              str(TINY.root / "llm"), "--device", "cpu"])
    models = served_models(args)
    assert [n for n, _ in models] == [CANARY, "parakeet"]  # the second named after its .nemo
    engines = [load_engine(ns) for _, ns in models]
    try:
        assert type(engines[0]) is Engine and type(engines[1]) is ParakeetEngine
        assert engines[1].transcribe([ROOT / utt(0)["file"]])[0].text == golden(utt(0))["text"]
    finally:
        for e in engines:
            e.close()
    alone = parser.parse_args(["--model", str(NEMO)])
    assert [n for n, _ in served_models(alone)] == ["parakeet"]  # a Parakeet first model is not "canary-qwen"
