"""Fuzz the audio decoding layer and the live server with malformed uploads.

    python benchmarks/fuzz.py --cases 1000 --decode-cases 5000 --out benchmarks/results/fuzz_cpu_tiny.json

Audio cases start from small valid files of every container libsndfile writes (WAV PCM and float, FLAC,
OGG/Vorbis, OGG/Opus, MP3) and from hand-made ones (absurd channel counts, rates, bit depths and declared sizes,
float samples that are NaN, infinite or too large, empty files, an hour of FLAC silence in 180 KB), then
apply a few mutations the way coverage-guided fuzzers do: truncation, byte flips, "interesting" integers
(0, 1, -1, 2^31, ...) written over header fields, bytes inserted, deleted or repeated. Multipart cases break
the form instead: missing, repeated or misnamed parts, bad boundaries and content types, non-UTF-8 fields,
then byte mutations of the whole body. Hypothesis draws the cases (tests/test_fuzz.py uses the same
strategies with fewer examples).

A case passes when it ends within its time bound and ``load_audio`` returns 16 kHz mono float32 samples that
are finite and within the length limit, or raises AudioError; and the server answers 200 with a
transcription, or a 4xx in OpenAI's error shape with a message. The report counts cases, outcomes, failures,
5xx answers and timeouts, and the server process's memory (RSS) at start and end and its peak in between.
By default the fixture model is served by ``canary-trt serve`` in a process of its own.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from hypothesis import strategies as st

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `runtime` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.audio import TARGET_RATE, AudioError, AudioTooLong, load_audio  # noqa: E402

MAX_SECONDS = 40.0  # decode limit of the in-process cases: the server's default
CASE_TIMEOUT_S = 60.0  # a case slower than this counts as a hang
INTERESTING = (0, 1, 2, 7, 8, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 2**63 - 1, -1, -2, -128)
BOUNDARY = "fuzzBoundary7MA4YWxk"


class Failure(AssertionError):
    """A case broke a rule (crash, hang, wrong answer); hypothesis shrinks these in tests."""


# ---- inputs -----------------------------------------------------------------------------------------------------

def wav(channels: int, rate: int, bits: int, payload: bytes, fmt: int = 1, data_size: int | None = None,
        riff_size: int | None = None) -> bytes:
    """A canonical 44-byte-header WAV with any field values, sizes included (wrapped to 32 bits)."""
    block = channels * bits // 8
    u32 = lambda x: x & 0xFFFFFFFF  # noqa: E731
    data_size = len(payload) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", u32(36 + data_size if riff_size is None else riff_size)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, fmt & 0xFFFF, channels & 0xFFFF, u32(rate), u32(rate * block),
                                    block & 0xFFFF, bits & 0xFFFF)
            + b"data" + struct.pack("<I", u32(data_size)) + payload)


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@lru_cache(maxsize=None)
def seed_files() -> dict[str, bytes]:
    """Half a second of a chirp in noise, in every container libsndfile writes."""
    rng = np.random.default_rng(0)

    def signal(rate, channels):
        t = np.arange(rate // 2) / rate
        x = 0.3 * np.sin(2 * np.pi * (200 + 1800 * t) * t) + 0.05 * rng.standard_normal(len(t))
        return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)

    mono, stereo = signal(16000, 1), signal(44100, 2)
    return {"wav_pcm16": _encode(mono, 16000, "WAV", "PCM_16"),
            "wav_float_stereo_44k": _encode(stereo, 44100, "WAV", "FLOAT"),
            "wav_pcm24_stereo_44k": _encode(stereo, 44100, "WAV", "PCM_24"),
            "flac": _encode(mono, 16000, "FLAC", "PCM_16"),
            "flac_stereo_44k": _encode(stereo, 44100, "FLAC", "PCM_24"),
            "ogg_vorbis": _encode(mono, 16000, "OGG", "VORBIS"),
            "ogg_opus_48k": _encode(signal(48000, 1), 48000, "OGG", "OPUS"),
            "mp3": _encode(mono, 16000, "MP3", "MPEG_LAYER_III")}


@lru_cache(maxsize=None)
def silence_bomb() -> bytes:
    """One hour of FLAC silence: about 180 KB that decode to 57.6 M samples (230 MB of float32)."""
    return _encode(np.zeros(3600 * 16000, np.int16), 16000, "FLAC", "PCM_16")


@lru_cache(maxsize=None)
def crafted_cases() -> tuple[tuple[str, bytes], ...]:
    """Hand-made malformed inputs: each names what it breaks."""
    pcm = np.round(np.sin(np.arange(1600) / 5) * 8000).astype("<i2").tobytes()
    floats = lambda *v: np.tile(np.array(v, "<f4"), 800).tobytes()  # noqa: E731
    cases = [("empty", b""), ("one_byte", b"R"), ("riff_magic_only", b"RIFF"), ("flac_magic_only", b"fLaC"),
             ("ogg_magic_only", b"OggS"), ("id3_then_garbage", b"ID3\x04\x00\x00\x00\x00\x00\x7f" + bytes(300)),
             ("text", b"this is not audio at all " * 40), ("json", b'{"audio": [0.1, 0.2]}'),
             ("zeros", bytes(4096)), ("random", np.random.default_rng(1).bytes(4096)),
             ("wav_header_only", wav(1, 16000, 16, b"")),
             ("wav_data_size_huge", wav(1, 16000, 16, pcm, data_size=0xFFFFFFF0)),
             ("wav_riff_size_zero", wav(1, 16000, 16, pcm, riff_size=0)),
             ("wav_riff_size_huge", wav(1, 16000, 16, pcm, riff_size=0xFFFFFFFF)),
             ("wav_pcm_float_nan", wav(1, 16000, 32, floats(0.1, np.nan, -0.1), fmt=3)),
             ("wav_pcm_float_inf", wav(1, 16000, 32, floats(0.1, np.inf, -np.inf), fmt=3)),
             ("wav_pcm_float_3e38", wav(1, 44100, 32, floats(3e38, -3e38, 3e38), fmt=3)),
             ("wav_8_channels_3_frames", wav(8, 16000, 16, pcm[:48])),
             # libsndfile refuses it, FFmpeg decodes 8 channels: PyAV's planar frames crashed on those
             ("wav_8_channels_x10", wav(8, 16000, 16, pcm[:48]) * 10),
             ("flac_silence_1h", silence_bomb())]
    cases += [(f"wav_{c}_channels", wav(c, 16000, 16, pcm)) for c in (0, 65, 1024, 0xFFFF)]
    cases += [(f"wav_rate_{r}", wav(1, r, 16, pcm)) for r in (0, 1, 999, 768001, 0xFFFFFFFF)]
    cases += [(f"wav_{b}_bits", wav(1, 16000, b, pcm)) for b in (0, 7, 64, 0xFFFF)]
    cases += [(f"wav_format_{f:#x}", wav(1, 16000, 16, pcm, fmt=f)) for f in (0, 2, 0x55, 0xFFFE, 0xFFFF)]
    return tuple(cases)


def mutate(data: bytes, op: tuple) -> bytes:
    """Apply one mutation ``(kind, position, argument)``; positions wrap around the data's length."""
    kind, pos, arg = op
    pos %= len(data) + 1
    if kind == "truncate":
        return data[:pos]
    if kind == "flip" and pos < len(data):
        return data[:pos] + bytes([data[pos] ^ arg]) + data[pos + 1:]
    if kind == "int":
        width, value, order = arg
        return data[:pos] + (value % (1 << 8 * width)).to_bytes(width, order) + data[pos + width:]
    if kind == "insert":
        return data[:pos] + arg + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + arg:]
    if kind == "repeat":
        size, times = arg
        return data[:pos] + data[pos:pos + size] * times + data[pos:]
    return data


_position = st.one_of(st.integers(0, 127), st.integers(0, 1 << 20))  # headers are at the start: favour them
mutations = st.one_of(
    st.tuples(st.just("truncate"), _position, st.none()),
    st.tuples(st.just("flip"), _position, st.integers(1, 255)),
    st.tuples(st.just("int"), st.integers(0, 127), st.tuples(st.sampled_from((1, 2, 4, 8)),
                                                              st.sampled_from(INTERESTING),
                                                              st.sampled_from(("little", "big")))),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), _position, st.integers(1, 512)),
    st.tuples(st.just("repeat"), _position, st.tuples(st.integers(1, 4096), st.integers(2, 64))),
)


@st.composite
def audio_cases(draw) -> tuple[str, bytes]:
    """(description, bytes): a seed or crafted file with 0-4 mutations; the description reproduces it."""
    name, data = draw(st.sampled_from(sorted(seed_files().items()) + list(crafted_cases())))
    ops = draw(st.lists(mutations, max_size=4))
    for op in ops:
        data = mutate(data, op)
    return f"{name} {ops}", data


def form_body(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY, eol: bytes = b"\r\n") -> bytes:
    """multipart/form-data from (field name, file name or None, value) parts, with any line ending."""
    out = []
    for name, filename, value in parts:
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        head = disposition.encode() + eol
        if filename is not None:
            head += b"Content-Type: application/octet-stream" + eol
        out.append(b"--" + boundary.encode() + eol + head + eol + value + eol)
    return b"".join(out) + b"--" + boundary.encode() + b"--" + eol


@st.composite
def multipart_cases(draw) -> tuple[str, bytes, str]:
    """(description, body, content type) of a transcription request whose form is broken somehow."""
    audio = draw(st.sampled_from([seed_files()["wav_pcm16"], b"", b"not audio"]))
    fields = {"model": draw(st.sampled_from(["canary-qwen-2.5b", "", "whisper-1", "x" * 300])),
              "response_format": draw(st.sampled_from(["json", "text", "srt", "bogus", ""])),
              "stream": draw(st.sampled_from(["false", "true", "maybe", ""])),
              "language": draw(st.sampled_from(["en", "fr", ""]))}
    parts = [(k, None, v.encode()) for k, v in fields.items() if draw(st.booleans())]
    file_name = draw(st.sampled_from(["file", "audio", "File", ""]))
    filename = draw(st.sampled_from(["speech.wav", "", "../../etc/passwd", 'a"b.wav', "\u00e9\u4e2d.wav", "x" * 500]))
    parts += [(file_name, filename, audio)] * draw(st.sampled_from((1, 1, 0, 2)))  # mostly once: reach the decoder
    parts += [(f"extra{i}", None, draw(st.binary(max_size=16))) for i in range(draw(st.sampled_from((0, 0, 1, 40))))]
    parts = draw(st.permutations(parts))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    body = form_body(parts, eol=eol)
    ops = draw(st.lists(mutations, max_size=3))
    for op in ops:
        body = mutate(body, op)
    content_type = draw(st.sampled_from([
        f"multipart/form-data; boundary={BOUNDARY}", f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/form-data; boundary="{BOUNDARY}"',
        "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=other",
        f"multipart/mixed; boundary={BOUNDARY}", "application/x-www-form-urlencoded", "application/json",
        "text/plain", "", "multipart/form-data; boundary=" + "b" * 300,
        f"multipart/form-data; boundary={BOUNDARY}; charset=klingon"]))
    described = [(n, f, len(v)) for n, f, v in parts]
    return f"parts={described} eol={eol!r} ops={ops} content_type={content_type!r}", body, content_type


# ---- checks -----------------------------------------------------------------------------------------------------

_pool = ThreadPoolExecutor(1, thread_name_prefix="fuzz-decode")  # a hung case leaves this one thread stuck


def check_load_audio(data: bytes, max_seconds: float = MAX_SECONDS, timeout: float = CASE_TIMEOUT_S) -> str:
    """Decode ``data``; returns the outcome ("ok", "AudioError", "AudioTooLong") or raises Failure."""
    future = _pool.submit(load_audio, data, max_seconds=max_seconds)
    try:
        out = future.result(timeout)
    except FutureTimeout:
        raise Failure(f"load_audio did not return within {timeout:g} s") from None
    except AudioError as e:
        if not str(e).strip():
            raise Failure("AudioError without a message") from None
        return type(e).__name__
    except Exception as e:
        raise Failure(f"load_audio raised {type(e).__name__}: {e}") from e
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 1 and out.size > 0
            and out.flags.c_contiguous and np.isfinite(out).all()):
        raise Failure(f"load_audio returned {type(out).__name__} {getattr(out, 'dtype', '')} "
                      f"{getattr(out, 'shape', '')} (expected finite 1-D float32 samples)")
    if out.size > max_seconds * TARGET_RATE + 64:  # + resampler rounding
        raise Failure(f"{out.size / TARGET_RATE:.1f} s of audio passed a limit of {max_seconds:g} s")
    return "ok"


def post(url: str, body: bytes, content_type: str, timeout: float = CASE_TIMEOUT_S,
         api_key: str | None = None) -> tuple[int, str, bytes]:
    """POST /v1/audio/transcriptions; returns (status, content type, body). Raises OSError/HTTPException."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    headers = {"Content-Type": content_type} if content_type else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", "/v1/audio/transcriptions", body, headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def check_answer(status: int, content_type: str, body: bytes) -> str:
    """The server's answer to a fuzzed request: returns "200" or the 4xx status, or raises Failure."""
    if status == 200:
        try:
            if content_type.startswith("application/json") and "text" not in json.loads(body):
                raise Failure(f"200 without a transcription: {body[:200]!r}")
            if content_type.startswith("text/event-stream"):
                events = [json.loads(line[5:]) for line in body.decode().splitlines() if line.startswith("data:")]
                if not events or events[-1].get("type") != "transcript.text.done":
                    raise Failure(f"stream did not end with transcript.text.done: {body[-300:]!r}")
        except (ValueError, TypeError, AttributeError):
            raise Failure(f"200 with a malformed body: {body[:300]!r}") from None
        return "200"
    if not 400 <= status < 500:
        raise Failure(f"HTTP {status}: {body[:300]!r}")
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise Failure(f"HTTP {status} not in OpenAI's error shape: {body[:300]!r}") from None
    if set(error) != {"message", "type", "param", "code"} or not str(error["message"]).strip():
        raise Failure(f"HTTP {status} error without the OpenAI fields or a message: {error}")
    return str(status)


def check_server(url: str, body: bytes, content_type: str, api_key: str | None = None) -> str:
    try:
        return check_answer(*post(url, body, content_type, api_key=api_key))
    except (OSError, http.client.HTTPException) as e:  # timeouts included: a hang
        raise Failure(f"no answer: {type(e).__name__}: {e}") from None


def audio_upload(data: bytes) -> tuple[bytes, str]:
    """A well-formed transcription form carrying ``data`` as the file."""
    return form_body([("model", None, b"canary-qwen-2.5b"), ("file", "upload.bin", data)]), \
        f"multipart/form-data; boundary={BOUNDARY}"


# ---- the long run -----------------------------------------------------------------------------------------------

class _Tally:
    def __init__(self):
        self.cases, self.outcomes, self.failures, self.slowest_s = 0, {}, [], 0.0

    def run(self, description: str, check) -> None:
        t0 = time.perf_counter()
        try:
            outcome = check()
        except Failure as e:
            outcome = "failure"
            self.failures.append({"case": description[:500], "error": str(e)[:500]})
        self.cases += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.slowest_s = max(self.slowest_s, time.perf_counter() - t0)

    def report(self) -> dict:
        return {"cases": self.cases, "outcomes": dict(sorted(self.outcomes.items())),
                "failures": len(self.failures), "failed_cases": self.failures[:50],
                "slowest_case_s": round(self.slowest_s, 3)}


def drive(strategy, examples: int, seed: int, fn) -> None:
    """Call ``fn`` on ``examples`` cases drawn from ``strategy`` (no shrinking: ``fn`` records, never raises)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    if examples < 1:
        return

    @fix_seed(seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(case):
        fn(case)

    one()


def fuzz(url: str, cases: int, decode_cases: int, seed: int = 0, pid: int | None = None,
         api_key: str | None = None) -> dict:
    """The long run: ``decode_cases`` in-process cases, then ``cases`` server cases (a third of them broken
    forms), with the server's memory before and after."""
    from benchmarks.soak import memory_mb, reset_peak_rss

    decode = _Tally()
    drive(audio_cases(), decode_cases, seed,
          lambda c: decode.run(c[0], lambda: check_load_audio(c[1])))
    for _ in range(3):  # warm-up: the first answers allocate caches that are no leak
        check_server(url, *audio_upload(seed_files()["wav_pcm16"]), api_key=api_key)
    reset_peak_rss(pid)
    start = memory_mb(pid)
    uploads, forms = _Tally(), _Tally()
    drive(audio_cases(), cases - cases // 3, seed + 1,
          lambda c: uploads.run(c[0], lambda: check_server(url, *audio_upload(c[1]), api_key=api_key)))
    drive(multipart_cases(), cases // 3, seed + 2,
          lambda c: forms.run(c[0], lambda: check_server(url, c[1], c[2], api_key=api_key)))
    end = memory_mb(pid)
    server = {"uploads": uploads.report(), "forms": forms.report()}
    statuses: dict[str, int] = {}
    for part in server.values():
        for k, v in part["outcomes"].items():
            statuses[k] = statuses.get(k, 0) + v
    fivexx = sum(1 for t in (uploads, forms) for f in t.failures if f["error"].startswith("HTTP 5"))
    return {"decode": decode.report(), "server": {
        "cases": uploads.cases + forms.cases, "outcomes": dict(sorted(statuses.items())),
        "failures": uploads.report()["failures"] + forms.report()["failures"], "http_5xx": fivexx,
        "memory_mb": None if start is None else {"start": start["rss"], "end": end["rss"], "peak": end["peak"]},
        **server}}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_name
    from benchmarks.soak import add_server_arguments, server_from_args

    parser = argparse.ArgumentParser(prog="fuzz.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="server cases (default: %(default)s)")
    parser.add_argument("--decode-cases", type=int, default=5000,
                        help="in-process load_audio cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    with server_from_args(args) as server:
        report = fuzz(server.url, args.cases, args.decode_cases, args.seed, server.pid, args.api_key)
    report = {"benchmark": "fuzz", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_name("cpu"), "server_command": server.command or server.url, "seed": args.seed,
              "server_exit_code": server.exit_code, "wall_s": round(time.perf_counter() - t0, 1), **report}
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    d, s = report["decode"], report["server"]
    print(f"load_audio: {d['cases']} cases {d['outcomes']}, {d['failures']} failures\n"
          f"server: {s['cases']} cases {s['outcomes']}, {s['failures']} failures, {s['http_5xx']} 5xx, "
          f"memory {s['memory_mb']} MB", file=sys.stderr)
    return 1 if d["failures"] or s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
