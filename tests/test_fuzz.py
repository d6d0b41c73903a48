"""Malformed audio and multipart bodies against ``load_audio`` and the live server: the short CI run of
benchmarks/fuzz.py, whose strategies and checks these are. Nothing crashes or hangs (every case has a time
bound), every answer is 200 or a 4xx in OpenAI's shape with a message, and memory stays bounded."""

from __future__ import annotations

import http.client
import io
import os
import subprocess
import sys
import tracemalloc

import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings

from benchmarks import fuzz
from benchmarks.soak import memory_mb, reset_peak_rss
from runtime.audio import AudioTooLong, load_audio

# derandomize: CI tries the same cases every run; benchmarks/fuzz.py explores afresh (seeded)
CI = dict(deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# What the brief's cases must give (case -> outcome, message fragment); the other crafted cases may decode.
EXPECTED = {
    "empty": ("AudioError", "empty upload"),
    "wav_header_only": ("AudioError", "audio is empty"),
    "wav_pcm_float_nan": ("AudioError", "NaN or infinite"),
    "wav_pcm_float_inf": ("AudioError", "NaN or infinite"),
    "wav_pcm_float_3e38": ("AudioError", "too large"),  # finite, but resampling overflows float32
    "wav_65_channels": ("AudioError", "65 channels"),
    "wav_1024_channels": ("AudioError", "1024 channels"),
    "wav_0_channels": ("AudioError", "cannot decode"),
    "wav_rate_0": ("AudioError", "cannot decode"),
    "wav_rate_999": ("AudioError", "implausible sample rate 999"),
    "wav_rate_768001": ("AudioError", "implausible sample rate 768001"),
    "wav_rate_4294967295": ("AudioError", "cannot decode"),
    "text": ("AudioError", "cannot decode"),
    "flac_silence_1h": ("AudioTooLong", "longer than 40 s"),
}


def test_crafted_inputs_decode_or_fail_with_a_clear_error():
    cases = dict(fuzz.crafted_cases())
    assert set(EXPECTED) <= set(cases)
    for name, data in cases.items():
        outcome = fuzz.check_load_audio(data, max_seconds=40)  # Failure on anything but samples or AudioError
        if name in EXPECTED:
            kind, words = EXPECTED[name]
            assert outcome == kind, name
            with pytest.raises(AudioTooLong if kind == "AudioTooLong" else Exception, match=words):
                load_audio(data, max_seconds=40)
    # the layout of a decoded file is known: 3 frames of 8 channels are 3 samples, not 8
    assert len(load_audio(cases["wav_8_channels_3_frames"])) == 3


def test_eight_channels_through_ffmpeg_do_not_crash_the_process():
    """Found by the fuzzer: 920 bytes that libsndfile refuses and FFmpeg decodes as 8 channels segfaulted in
    PyAV (planar frames), killing the server. Run apart, so a regression fails this test, not the whole run."""
    code = ("from benchmarks import fuzz; from runtime.audio import load_audio; "
            "print(len(load_audio(dict(fuzz.crafted_cases())['wav_8_channels_x10'])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0


def test_decompression_bomb_decodes_no_further_than_the_limit():
    """180 KB of FLAC declare an hour (230 MB of float32): with a limit, decoding stops there, so memory stays at
    a few blocks whatever the upload declares."""
    bomb = fuzz.silence_bomb()
    assert len(bomb) < 256 * 1024 and sf.info(io.BytesIO(bomb)).frames == 3600 * 16000
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        with pytest.raises(AudioTooLong, match="longer than 10 s"):
            load_audio(bomb, max_seconds=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB traced while refusing the bomb"


@settings(max_examples=200, **CI)
@given(fuzz.audio_cases())
def test_mutated_files_decode_or_fail_with_a_clear_error(case):
    fuzz.check_load_audio(case[1])


# ---- the live server --------------------------------------------------------------------------------------------

pytest.importorskip("fastapi", reason="needs the serving extra")

from serving_helpers import LiveServer, build_engine  # noqa: E402
from test_server import metric  # noqa: E402
from runtime.server import ServerSettings  # noqa: E402

SETTINGS = ServerSettings(max_upload_bytes=1 << 20, max_audio_seconds=10.0)
GROWTH_MB = 150  # RSS allowed to grow over a run of cases: allocator and thread-pool warm-up, far below a bomb


@pytest.fixture(scope="module")
def server():
    s = LiveServer(build_engine(max_batch_size=8), SETTINGS)
    for _ in range(3):  # warm-up: the first answers allocate caches that are no leak
        fuzz.check_server(s.url, *fuzz.audio_upload(fuzz.seed_files()["wav_pcm16"]))
    yield s
    s.stop()


def test_server_answers_crafted_uploads_with_4xx(server):
    pid = os.getpid()  # the server runs in this process
    for name, data in fuzz.crafted_cases():
        reset_peak_rss(pid)
        before = memory_mb(pid)["rss"]
        status = fuzz.check_server(server.url, *fuzz.audio_upload(data))
        if name in EXPECTED:
            assert status == ("413" if EXPECTED[name][0] == "AudioTooLong" else "400"), name
        peak = memory_mb(pid)["peak"]
        assert peak - before < 64, f"{name}: RSS peaked {peak - before:.0f} MB above its start"


def test_server_survives_fuzzed_uploads_and_forms(server):
    pid = os.getpid()
    start = memory_mb(pid)["rss"]
    reset_peak_rss(pid)

    @settings(max_examples=60, **CI)
    @given(fuzz.audio_cases())
    def upload(case):
        fuzz.check_server(server.url, *fuzz.audio_upload(case[1]))

    @settings(max_examples=60, **CI)
    @given(fuzz.multipart_cases())
    def form(case):
        fuzz.check_server(server.url, case[1], case[2])

    upload()
    form()
    end = memory_mb(pid)
    assert end["rss"] - start < GROWTH_MB and end["peak"] - start < GROWTH_MB, (start, end)
    assert fuzz.check_server(server.url, *fuzz.audio_upload(fuzz.seed_files()["flac"])) == "200"  # still serving


def test_oversized_body_without_content_length_is_cut_off(server):
    """A chunked upload declares no length: the server stops reading past the limit and answers 413."""
    refused = 'canary_request_errors_total{kind="upload_too_large"}'
    before = metric(server.url, refused)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body, ctype = fuzz.audio_upload(b"\0" * (SETTINGS.max_upload_bytes * 4))
    try:
        conn.request("POST", "/v1/audio/transcriptions", (body[i:i + 65536] for i in range(0, len(body), 65536)),
                     {"Content-Type": ctype}, encode_chunked=True)
        resp = conn.getresponse()
        assert fuzz.check_answer(resp.status, resp.getheader("Content-Type"), resp.read()) == "413"
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the client had sent everything: the counter tells
    finally:
        conn.close()
    assert metric(server.url, refused) == before + 1
