"""The Python API and the CLI reproduce the NeMo goldens end to end, from audio files."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from conftest import FIXTURES
from runtime import AudioError, CanaryQwen
from runtime.cli import main

TINY = FIXTURES / "tiny-canary-qwen"
ARGS = ["--model", str(TINY / "model"), "--llm", str(TINY / "llm"), "--device", "cpu"]


@pytest.fixture(scope="module")
def asr() -> CanaryQwen:
    return CanaryQwen.from_pretrained(TINY / "model", TINY / "llm", device="cpu")


@pytest.fixture(scope="module")
def expected() -> dict:
    meta = json.loads((TINY / "golden.json").read_text())
    return {s: meta["per_utterance"][s]["single"] for s in (a["stem"] for a in meta["audio_files"])}


def test_api_matches_goldens_in_input_order(asr, expected):
    files = [TINY / "audio" / f"{s}.wav" for s in expected]
    results = asr.transcribe(files[::-1], batch_size=2, max_new_tokens=24)
    for f, r in zip(files[::-1], results):
        ref = expected[f.stem]
        ids = [int(i) for i in ref["gen_ids"]]
        assert r.token_ids == (ids[:-1] if ref["eos_produced"] else ids)
        assert r.finish_reason == ("stop" if ref["eos_produced"] else "length")
        assert r.text == ref["text"].strip()
        assert r.duration == pytest.approx(sf.info(str(f)).frames / 16000)


def test_api_single_input_and_arrays(asr, expected):
    wav, sr = sf.read(str(TINY / "audio" / "a2_morning.wav"), dtype="float32")
    r = asr.transcribe(wav, sample_rate=sr, max_new_tokens=24)
    assert r.text == expected["a2_morning"]["text"].strip()
    stereo_8k = np.stack([wav, wav], 1)[::2]  # decimated stereo: still transcribes, after downmix + resample
    assert asr.transcribe(stereo_8k, sample_rate=8000, max_new_tokens=4).duration == pytest.approx(len(wav) / 16000,
                                                                                                   abs=1e-3)


def test_max_new_tokens_truncates(asr):
    r = asr.transcribe(TINY / "audio" / "a5_numbers.wav", max_new_tokens=3)
    assert len(r.token_ids) == 3 and r.finish_reason == "length"


def test_tiny_clips_do_not_crash(asr):
    for n in (1, 100, 159, 160, 319):
        r = asr.transcribe(np.full(n, 0.01, np.float32), sample_rate=16000, max_new_tokens=2)
        assert len(r.token_ids) <= 2
    with pytest.raises(AudioError, match="empty"):
        asr.transcribe(np.zeros(0, np.float32), sample_rate=16000)


def test_cli_jsonl_and_per_file_errors(tmp_path, capsys, expected):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    good = [str(TINY / "audio" / f"{s}.wav") for s in expected]
    code = main(["transcribe", good[0], str(bad), *good[1:], *ARGS, "--max-new-tokens", "24",
                 "--output-format", "jsonl", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{bad}: cannot decode audio" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["audio"] for r in rows] == [good[0], str(bad), *good[1:]]
    assert "error" in rows[1]
    for row in rows[:1] + rows[2:]:
        stem = row["audio"].rsplit("/", 1)[1][:-4]
        assert row["text"] == expected[stem]["text"].strip()
        assert set(row) == {"audio", "text", "token_ids", "duration", "finish_reason"}


def test_cli_text_output(capsys, expected):
    assert main(["transcribe", str(TINY / "audio" / "a2_morning.wav"), *ARGS, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == expected["a2_morning"]["text"].strip() + "\n"


def test_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["transcribe", str(TINY / "audio" / "a2_morning.wav"), "--model", str(tmp_path / "none"),
                 "--llm", str(TINY / "llm")]) == 2
    assert "cannot load the model" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("canary-trt") is None, reason="package not installed (pip install -e .)")
def test_console_script_is_installed():
    out = subprocess.run(["canary-trt", "transcribe", "--help"], capture_output=True, text=True, check=True)
    assert "--output-format" in out.stdout
