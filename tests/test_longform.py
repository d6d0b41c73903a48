"""Long-form transcription: pause-aligned segments of bounded length, nothing lost, stitched in order, and the
SRT / WebVTT / JSON formats.

Test speech is the fixture's espeak-ng utterances (tests/fixtures/tiny-canary-qwen/audio) joined by pauses of
low noise, so no system package is needed and we know exactly where every utterance lies. The fixture model has
random weights, so its text carries no meaning, but it is deterministic and batch-independent (test_engine.py):
every segment's tokens must be what that piece of audio gives alone, and a segment that is a whole utterance must
give NeMo's golden tokens."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import soundfile as sf

from conftest import FIXTURES, Golden
from test_engine import _TorchEncoder

from engine.checkpoint import build_model, resolve
from runtime import longform
from runtime.api import CanaryQwen
from runtime.engine import Engine, EngineOptions
from runtime.longform import LongTranscription, Segment, plan_segments, to_json, to_srt, to_vtt, transcribe_long

TINY = Golden(FIXTURES / "tiny-canary-qwen")
SR = 16000
NEEDS_SILERO = pytest.mark.skipif(not longform.silero_available(), reason="silero-vad / onnxruntime not installed")
VADS = [pytest.param("silero", marks=NEEDS_SILERO), "energy"]


def utterance(stem: str) -> np.ndarray:
    return TINY.audio(stem).numpy()


def speech_extent(wave: np.ndarray) -> tuple[int, int]:
    """First and one-past-last sample louder than the pause noise: where the utterance really is."""
    loud = np.nonzero(np.abs(wave) > 0.01)[0]
    return int(loud[0]), int(loud[-1]) + 1


def build(stems: list[str], pauses: list[float], seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Utterances separated by pauses of noise at -60 dBFS; returns the audio and each utterance's extent."""
    rng = np.random.default_rng(seed)
    parts, extents, at = [], [], 0
    for i, stem in enumerate(stems):
        w = utterance(stem)
        a, b = speech_extent(w)
        extents.append((at + a, at + b))
        parts.append(w)
        at += len(w)
        if i < len(pauses):
            n = int(pauses[i] * SR)
            parts.append((rng.standard_normal(n) * 1e-3).astype(np.float32))
            at += n
    return np.concatenate(parts), extents


@pytest.fixture(scope="module")
def long_audio():
    """~79 s: the five utterances four times over, pauses of 0.6-1.5 s."""
    rng = np.random.default_rng(1)
    stems = TINY.stems * 4
    return build(stems, list(rng.uniform(0.6, 1.5, len(stems) - 1)))


@pytest.fixture(scope="module")
def model():
    return build_model(resolve(TINY.root / "model", TINY.root / "llm"))


@pytest.fixture(scope="module")
def engine(model):
    net, tok = model
    eng = Engine(net, tok, _TorchEncoder(net), options=EngineOptions(max_new_tokens=TINY.max_new_tokens,
                                                                     max_batch_size=8))
    yield eng
    eng.close()


def check_plan(cuts, n_samples, max_s, extents):
    """Bounded, ordered, disjoint segments inside the audio, and every utterance wholly inside one segment:
    so every boundary lies in a pause and no speech is left out."""
    assert cuts
    for a, b in cuts:
        assert 0 <= a < b <= n_samples
        assert b - a <= max_s * SR
    for (_, b), (a, _) in pairwise(cuts):
        assert b <= a
    for lo, hi in extents:
        assert sum(a <= lo and hi <= b for a, b in cuts) == 1, (lo / SR, hi / SR, [(a / SR, b / SR) for a, b in cuts])


@pytest.mark.parametrize("vad", VADS)
@pytest.mark.parametrize("max_s", [40.0, 10.0])
def test_segments_are_bounded_and_cut_in_pauses(long_audio, vad, max_s):
    wave, extents = long_audio
    assert len(wave) > 40 * SR
    cuts, name = plan_segments(wave, max_s, vad)
    assert name == vad
    check_plan(cuts, len(wave), max_s, extents)
    assert len(cuts) >= (2 if max_s == 40 else 8)


@pytest.mark.parametrize("vad", VADS)
def test_speech_without_pauses_is_cut_into_contiguous_pieces(vad):
    """No pause to use: the pieces must still be bounded and together cover all the speech, with nothing
    dropped between them (each cut at the quietest frame of its window)."""
    pieces = [utterance(s) for s in TINY.stems * 2]
    wave = np.concatenate([w[slice(*speech_extent(w))] for w in pieces])  # ~25 s, no silence between utterances
    cuts, _ = plan_segments(wave, 5.0, vad)
    assert all(b - a <= 5 * SR for a, b in cuts)
    assert all(b1 == a2 for (_, b1), (a2, _) in pairwise(cuts))
    lo, hi = speech_extent(wave)
    assert cuts[0][0] <= lo and hi <= cuts[-1][1]
    assert all(b - a >= 2.5 * SR for a, b in cuts[:-1])  # cuts in the second half of the window


@pytest.mark.parametrize("vad, noise", [pytest.param("silero", 1e-3, marks=NEEDS_SILERO), ("energy", 1e-4)])
def test_silence_has_no_segments(vad, noise):
    """Digital silence and quiet noise give no segment. The energy detector judges level relative to the
    recording itself, so it can only call noise below -70 dBFS silence when there is no speech to compare to;
    silero recognises noise at -60 dBFS as not speech."""
    wave = (np.random.default_rng(0).standard_normal(20 * SR) * noise).astype(np.float32)
    wave[: 5 * SR] = 0
    assert plan_segments(wave, 40.0, vad)[0] == []


def test_vad_none_is_fixed_windows_and_auto_falls_back_to_energy(monkeypatch, long_audio):
    wave, _ = long_audio
    cuts, name = plan_segments(wave, 10.0, "none")
    assert name == "none" and cuts[0][0] == 0 and cuts[-1][1] == len(wave)
    assert all(b1 == a2 for (_, b1), (a2, _) in pairwise(cuts))
    assert all(b - a == 10 * SR // 512 * 512 for a, b in cuts[:-1])
    monkeypatch.setattr(longform, "_silero_path", lambda: None)
    assert plan_segments(wave, 40.0, "auto")[1] == "energy"
    with pytest.raises(RuntimeError, match="silero-vad"):
        plan_segments(wave, 40.0, "silero")
    with pytest.raises(ValueError, match="unknown vad"):
        plan_segments(wave, 40.0, "webrtc")
    with pytest.raises(ValueError, match="max_segment_s"):
        plan_segments(wave, 0.5, "energy")


def test_long_audio_is_transcribed_completely_in_order(engine, model, long_audio):
    """Every segment's tokens are what its audio gives alone (so batching the segments together loses or moves
    nothing), the text is the segment texts in order, timestamps are monotonic and inside the audio; the
    reference API's static batches give the same segments."""
    wave, _ = long_audio
    t = transcribe_long(engine, wave, SR, max_segment_s=10.0, vad="energy")
    cuts, _ = plan_segments(wave, 10.0, "energy")
    assert [(round(s.start * SR), round(s.end * SR)) for s in t.segments] == cuts
    alone = [engine.submit(wave[a:b], sample_rate=SR).result(120) for a, b in cuts]
    assert [s.token_ids for s in t.segments] == [r.token_ids for r in alone]
    assert [s.text for s in t.segments] == [r.text for r in alone]
    assert t.text == " ".join(r.text for r in alone if r.text)
    assert t.duration == pytest.approx(len(wave) / SR) and t.vad == "energy"
    times = [x for s in t.segments for x in (s.start, s.end)]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= t.duration
    net, tok = model
    ref = transcribe_long(CanaryQwen(net, tok), wave, SR, max_segment_s=10.0, vad="energy",
                          max_new_tokens=TINY.max_new_tokens)
    assert [s.token_ids for s in ref.segments] == [s.token_ids for s in t.segments]


def test_audio_that_fits_one_window_gives_nemo_golden_tokens(engine):
    """With fixed windows (vad='none') a clip shorter than the maximum is one segment, the whole clip: the
    long-form path must then give exactly what NeMo gave for it."""
    for stem in ("a3_fox", "a5_numbers"):
        t = transcribe_long(engine, TINY.audio_path(stem), max_segment_s=40.0, vad="none")
        golden = TINY.tensors[f"single.{stem}.gen_ids"].tolist()
        if TINY.meta["per_utterance"][stem]["single"]["eos_produced"]:
            golden = golden[:-1]
        assert len(t.segments) == 1 and t.segments[0].token_ids == golden
        assert t.segments[0].start == 0 and t.segments[0].end == pytest.approx(t.duration)


def test_cut_in_a_pause_keeps_each_utterance_whole(engine):
    """Two utterances and a 2 s pause, cut between them: each segment holds one whole utterance, and its
    tokens are those of that segment's audio alone."""
    wave, extents = build(["a4_stella", "a5_numbers"], [2.0])
    t = transcribe_long(engine, wave, SR, max_segment_s=8.0, vad="energy")
    assert len(t.segments) == 2
    for s, (lo, hi) in zip(t.segments, extents):
        a, b = round(s.start * SR), round(s.end * SR)
        assert a <= lo and hi <= b
        assert s.token_ids == engine.submit(wave[a:b], sample_rate=SR).result(60).token_ids


T = LongTranscription("hello there general kenobi", [
    Segment(0.0, 1.5, "hello there", [1, 2], "stop", 0.25, [-0.5, -1.5]),
    Segment(2.0, 3.0, "", [], "stop"),
    Segment(3661.25, 3723.0005, "general kenobi", [3], "length")], 3800.0, "silero")


def test_srt_and_vtt():
    assert to_srt(T) == ("1\n00:00:00,000 --> 00:00:01,500\nhello there\n\n"
                         "2\n01:01:01,250 --> 01:02:03,000\ngeneral kenobi\n\n")
    assert to_vtt(T) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello there\n\n"
                         "01:01:01.250 --> 01:02:03.000\ngeneral kenobi\n\n")


def test_timestamped_json():
    body = json.loads(to_json(T))
    assert body["text"] == T.text and body["duration"] == 3800.0 and body["vad"] == "silero"
    assert [s["id"] for s in body["segments"]] == [0, 1, 2]
    assert body["segments"][2] == {"id": 2, "start": 3661.25, "end": 3723.0005, "text": "general kenobi",
                                   "token_ids": [3], "finish_reason": "length", "no_speech_prob": None}
    assert body["segments"][0]["avg_logprob"] == -1.0 and body["segments"][0]["no_speech_prob"] == 0.25


def test_segment_scores():
    """no_speech_prob: 1 - the best MIN_SPEECH_S (3-frame) mean of the VAD scores inside the segment, so one
    loud frame is not speech; compression_ratio: Whisper's bytes / zlib-compressed bytes."""
    import zlib

    score = np.zeros(100, np.float32)
    score[10] = 1.0  # a click
    score[50:53] = 0.9  # a short word
    f = 512
    assert longform.no_speech_prob(score, 0, 40 * f) == pytest.approx(1 - 1 / 3, abs=1e-4)
    assert longform.no_speech_prob(score, 40 * f, 100 * f) == pytest.approx(0.1, abs=1e-4)
    assert longform.no_speech_prob(score, 60 * f, 100 * f) == 1.0
    text = "the the the the the the the the the the"
    assert longform.compression_ratio(text) == pytest.approx(len(text) / len(zlib.compress(text.encode())), abs=1e-4)
    assert longform.compression_ratio(text) > 2 > longform.compression_ratio("a quick brown fox")
    assert longform.compression_ratio("") == 0.0


def test_cli_writes_srt(capsys, tmp_path, engine, long_audio):
    """``canary-trt transcribe --output-format srt`` on one long file: the SRT of the long-form transcription
    on stdout; no progress bar when stderr is not a terminal."""
    from runtime.cli import main

    wave, _ = long_audio
    path = tmp_path / "long.wav"
    sf.write(path, wave, SR)
    args = [str(path), "--model", str(TINY.root / "model"), "--llm", str(TINY.root / "llm"), "--device", "cpu",
            "--max-new-tokens", str(TINY.max_new_tokens), "--batch-size", "4", "--max-seq-len", "512",
            "--max-segment-seconds", "60", "--vad", "energy", "--output-format", "srt"]
    assert main(["transcribe", *args]) == 0
    out, err = capsys.readouterr()
    assert "segment" not in err
    expected = transcribe_long(engine, wave, SR, max_segment_s=60.0, vad="energy")
    assert out == to_srt(expected) and len(expected.segments) == 2
