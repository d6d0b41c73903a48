"""Audio input: containers, downmix, resampling, in-memory arrays, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import FIXTURES
from runtime.audio import AudioError, load_audio

WAV = FIXTURES / "tiny-canary-qwen" / "audio" / "a3_fox.wav"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return sf.read(str(WAV), dtype="float32")[0]


def test_wav_is_read_exactly(speech):
    assert np.array_equal(load_audio(WAV), speech)
    assert np.array_equal(load_audio(str(WAV)), speech)
    assert np.array_equal(load_audio(WAV.read_bytes()), speech)


@pytest.mark.parametrize("fmt,subtype,tol", [
    ("FLAC", "PCM_16", 0.0), ("OGG", "VORBIS", None), ("OGG", "OPUS", None), ("MP3", "MPEG_LAYER_III", None)])
def test_compressed_containers(tmp_path, speech, fmt, subtype, tol):
    rate = 48000 if subtype == "OPUS" else 16000  # Opus only runs at 8/12/16/24/48 kHz; 48k also tests resampling
    data = speech
    if rate != 16000:
        import soxr

        data = soxr.resample(speech, 16000, rate)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(str(path), data, rate, format=fmt, subtype=subtype)
    out = load_audio(path)
    if tol == 0.0:
        assert np.array_equal(out, speech)
        return
    # Lossy codecs add delay/padding: compare energy envelopes, robust to a few ms of shift.
    assert abs(len(out) - len(speech)) < 0.1 * 16000
    n = min(len(out), len(speech)) // 800 * 800
    env = lambda x: np.sqrt((x[:n].reshape(-1, 800) ** 2).mean(1))  # noqa: E731
    assert np.corrcoef(env(out), env(speech))[0, 1] > 0.9


def test_stereo_is_downmixed_both_layouts(speech):
    stereo = np.stack([speech, 0.5 * speech], axis=1)  # [samples, channels]
    expected = stereo.mean(axis=1)
    assert np.allclose(load_audio(stereo, 16000), expected, atol=1e-7)
    assert np.allclose(load_audio(torch.from_numpy(stereo.T.copy()), 16000), expected, atol=1e-7)  # [ch, samples]


def test_resampling_keeps_pitch_and_duration():
    rate = 44100
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = load_audio(tone, rate)
    assert len(out) == 32000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440.0) <= 1.0
    assert abs(np.sqrt((out[1000:-1000] ** 2).mean()) - 0.5 / np.sqrt(2)) < 0.01


def test_integer_pcm_arrays(speech):
    pcm = np.round(speech * 32768).astype(np.int16)
    assert np.allclose(load_audio(pcm, 16000), speech, atol=1 / 32768)


@pytest.mark.parametrize("source,sr,match", [
    (b"not audio at all, just bytes" * 10, None, "cannot decode audio"),
    (b"", None, "empty upload"),
    (np.zeros(0, np.float32), 16000, "audio is empty"),
    (np.array([0.0, np.nan, 0.1], np.float32), 16000, "NaN or infinite"),
    (np.zeros(100, np.float32), None, "needs its sample_rate"),
    (np.zeros(100, np.float32), 5, "implausible sample rate"),
    (np.zeros((2, 2, 2), np.float32), 16000, "expected 1-D or 2-D"),
])
def test_bad_inputs_have_clear_errors(source, sr, match):
    with pytest.raises(AudioError, match=match):
        load_audio(source, sr)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(AudioError, match=r"nowhere\.wav: no such file"):
        load_audio(tmp_path / "nowhere.wav")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(WAV.read_bytes()[:30])
    with pytest.raises(AudioError, match=r"truncated\.wav: cannot decode audio"):
        load_audio(truncated)
