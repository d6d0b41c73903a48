"""``canary-trt bench`` (runtime/bench.py) and ``canary-trt bench-serve`` (runtime/bench_serve.py): WER and the
normaliser on known pairs, RTFx arithmetic, manifest errors that name file and line, the whole bench on the
fixture model against NeMo's golden transcripts, and the load generator against a stub server on 127.0.0.1."""

from __future__ import annotations

import email
import importlib.util
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from runtime import bench as rtfx, bench_serve as load
from runtime.bench import ManifestError, Utterance, composite, read_manifest, word_errors
from conftest import FIXTURES, Golden

TINY = Golden(FIXTURES / "tiny-canary-qwen")


# ---- normaliser and WER -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, hyp", [
    ("Hello, World!", "hello world"),  # case and punctuation do not count
    ("Mr. Smith paid $20.50.", "mister smith paid $20.50"),  # titles spelled out
    ("I can't go, it's 1,000 colours.", "i can not go it is 1000 colors"),  # contractions, digits, spelling
    ("Uh, the um answer", "the answer"),  # fillers removed
    ("twenty five dollars", "$25"),  # numbers normalised
])
def test_normaliser_makes_equivalent_pairs_equal(ref, hyp):
    assert word_errors([ref], [hyp])["wer"] == 0.0


def test_wer_counts():
    e = word_errors(["the cat sat on the mat", "a b c d"], ["the cat sat on mat", "a x c d e"])
    # first: one deletion; second: one substitution, one insertion; 10 reference words in all
    assert (e["sub"], e["del"], e["ins"], e["ref_words"]) == (1, 1, 1, 10)
    assert e["wer"] == 30.0
    assert word_errors(["a white paper"], ["a whitepaper"])["wer"] == 0.0  # split compounds (leaderboard)
    assert word_errors(["(laughs)"], ["word"]) == {"sub": 0, "del": 0, "ins": 1, "ref_words": 0, "wer": None}


def test_composite_rtfx_is_summed_audio_over_summed_time():
    ds = [{"audio_s": 100.0, "time_s": {"median": 2.0}, "wer": 10.0,
           "errors": {"sub": 5, "del": 0, "ins": 0, "ref_words": 50}},
          {"audio_s": 50.0, "time_s": {"median": 3.0}, "wer": 2.0,
           "errors": {"sub": 1, "del": 0, "ins": 1, "ref_words": 100}}]
    c = composite(ds)
    assert c["rtfx"] == 30.0  # 150 s / 5 s, not the mean of 50 and 16.7
    assert c["wer_mean_of_datasets"] == 6.0  # the leaderboard's average WER
    assert c["wer_all_words"] == 4.67  # 7 errors / 150 words


def test_timed_passes_exclude_warmup_alternate_and_summarise():
    items = [Utterance(f"u{i}.wav", d, "x") for i, d in enumerate([9.0, 5.0, 3.0])]  # longest first
    seconds = {"u0.wav": 9.0, "u1.wav": 5.0, "u2.wav": 3.0}
    calls = []

    def fake(name, text):
        def transcribe(paths):
            calls.append((name, list(paths)))
            return [(text if p != "u2.wav" else "x", 2, "stop", seconds[p]) for p in paths]
        return transcribe

    runs = rtfx.timed_passes({"ours": fake("ours", "x"), "base": fake("base", "y")}, items, repeats=3, warmup=2)
    every = ["u0.wav", "u1.wav", "u2.wav"]
    assert calls == [("ours", every[:2]), ("base", every[:2])] + [("ours", every), ("base", every)] * 3
    assert all(len(times) == 3 and len(passes) == 3 for times, passes in runs.values())
    d = rtfx.summarise("set", "m.jsonl", items, [4.0, 2.0, 8.0], runs["ours"][1])
    assert d["audio_s"] == 17.0 and d["time_s"]["median"] == 4.0 and d["rtfx"] == 4.25 and d["rtfx_best"] == 8.5
    assert d["tokens"] == 6 and d["wer"] == 0.0 and d["same_text_every_pass"]
    calls.clear()
    out = rtfx.bench_all({"ours": fake("ours", "x"), "base": fake("base", "y")}, [("set", "m", items)], 1, 0)
    assert out["base"][0]["same_text_as_ours"] == 1 and "same_text_as_ours" not in out["ours"][0]
    assert out["base"][0]["wer"] == pytest.approx(100 * 2 / 3, abs=0.01)


# ---- manifests --------------------------------------------------------------------------------------------------

@pytest.fixture
def wav_dir(tmp_path):
    (tmp_path / "audio").mkdir()
    for stem in ("a1_yes", "a3_fox"):
        shutil.copy(TINY.audio_path(stem), tmp_path / "audio" / f"{stem}.wav")
    return tmp_path


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_manifest_paths_are_relative_to_it_and_sorted_longest_first(wav_dir):
    (wav_dir / "sets").mkdir()
    m = write(wav_dir / "sets" / "m.jsonl", [
        {"audio_filepath": "../audio/a1_yes.wav", "duration": 0.35, "text": "Yes."},
        "",
        {"audio_filepath": str(wav_dir / "audio" / "a3_fox.wav"), "text": "The quick brown fox."}])
    items = read_manifest(m)
    assert [u.audio.resolve() for u in items] == [(wav_dir / "audio" / f).resolve() for f in ("a1_yes.wav", "a3_fox.wav")]
    assert items[1].duration == pytest.approx(2.725)  # absent: read from the file
    assert [u.audio.name for u in rtfx.longest_first(items)] == ["a3_fox.wav", "a1_yes.wav"]


@pytest.mark.parametrize("bad, message", [
    ('{"audio_filepath": "audio/a1_yes.wav", "duration": 0.3', r"m\.jsonl:2: not valid JSON"),
    ('["audio/a1_yes.wav"]', r"m\.jsonl:2: expected a JSON object"),
    ({"duration": 1.0, "text": "x"}, r"m\.jsonl:2: missing 'audio_filepath'"),
    ({"audio_filepath": "audio/nope.wav", "text": "x"}, r"m\.jsonl:2: audio file not found: .*nope\.wav"),
    ({"audio_filepath": "audio/a1_yes.wav", "duration": -1, "text": "x"}, r"m\.jsonl:2: 'duration' must be"),
    ({"audio_filepath": "audio/a1_yes.wav", "duration": "1", "text": "x"}, r"m\.jsonl:2: 'duration' must be"),
    ({"audio_filepath": "audio/a1_yes.wav", "text": 3}, r"m\.jsonl:2: 'text' must be a string"),
    ({"audio_filepath": "audio/a1_yes.wav"}, r"m\.jsonl:2: no 'text', unlike the lines before"),
])
def test_manifest_errors_name_file_and_line(wav_dir, bad, message):
    m = write(wav_dir / "m.jsonl", [{"audio_filepath": "audio/a3_fox.wav", "duration": 2.7, "text": "fox"}, bad])
    with pytest.raises(ManifestError, match=message):
        read_manifest(m)


def test_empty_or_missing_manifest_and_folder(wav_dir):
    with pytest.raises(ManifestError, match="no utterances"):
        read_manifest(write(wav_dir / "m.jsonl", ["", "  "]))
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(wav_dir / "absent.jsonl")
    (wav_dir / "empty").mkdir()
    with pytest.raises(ManifestError, match="no audio files"):
        rtfx.read_folder(wav_dir / "empty")
    assert [u.audio.name for u in rtfx.read_folder(wav_dir)] == ["a1_yes.wav", "a3_fox.wav"]


# ---- the whole bench on the fixture model ------------------------------------------------------------------------

@pytest.fixture
def fixture_engine(monkeypatch):
    """Engine.from_pretrained replaced by the fixture model behind the test encoder (the encoder backends are
    tested elsewhere); records the keyword arguments bench passed."""
    from test_engine import _TorchEncoder

    from engine.checkpoint import build_model, resolve
    from runtime.engine import Engine, EngineOptions

    net, tok = build_model(resolve(TINY.root / "model", TINY.root / "llm"))
    seen = {}

    def fake(cls, **kw):
        seen.update(kw)
        opts = {k: kw[k] for k in ("max_batch_size", "max_new_tokens", "max_seq_len") if k in kw}
        return Engine(net, tok, _TorchEncoder(net), options=EngineOptions(**opts))

    monkeypatch.setattr(Engine, "from_pretrained", classmethod(fake))
    return seen


def test_bench_on_fixture_scores_nemo_golden_transcripts(fixture_engine, tmp_path, capsys):
    """The fixture engine reproduces NeMo's greedy ids (test_engine.py), so the bench's WER must be the WER of
    NeMo's golden texts against the references, computed independently here."""
    manifest = tmp_path / "fixture.jsonl"
    write(manifest, [{"audio_filepath": str(TINY.audio_path(a["stem"])), "duration": a["duration_s"],
                      "text": a["text"]} for a in TINY.meta["audio_files"]])
    out = tmp_path / "runs.jsonl"
    argv = ["--manifest", str(manifest), "--audio-dir", str(TINY.root / "audio"), "--model", "m", "--repeats", "2",
            "--warmup", "1", "--max-batch-size", "3", "--max-new-tokens", str(TINY.max_new_tokens), "--out", str(out)]
    assert rtfx.main(argv) == 0
    stdout, stderr = capsys.readouterr()
    report = json.loads(stdout)
    assert json.loads(out.read_text()) == report  # one JSON line, also appended to --out
    assert fixture_engine["max_batch_size"] == 3 and fixture_engine["max_new_tokens"] == TINY.max_new_tokens
    fixture, folder = report["datasets"]
    golden = [TINY.meta["per_utterance"][a["stem"]]["single"]["text"] for a in TINY.meta["audio_files"]]
    expected = word_errors([a["text"] for a in TINY.meta["audio_files"]], golden)
    assert fixture["wer"] == expected["wer"] and fixture["errors"] == {k: expected[k] for k in fixture["errors"]}
    assert fixture["utterances"] == 5 and len(fixture["time_s"]["all"]) == 2 and fixture["same_text_every_pass"]
    total = sum(a["duration_s"] for a in TINY.meta["audio_files"])
    assert fixture["audio_s"] == pytest.approx(total, abs=1e-3)
    assert fixture["rtfx"] == pytest.approx(fixture["audio_s"] / fixture["time_s"]["median"], rel=1e-3)
    assert "wer" not in folder and folder["audio_s"] == fixture["audio_s"]  # the same files, no references
    c = report["composite"]
    assert c["rtfx"] == pytest.approx((fixture["audio_s"] + folder["audio_s"]) /
                                      (fixture["time_s"]["median"] + folder["time_s"]["median"]), rel=1e-3)
    for key in ("device", "precision", "backends", "batch_policy", "timed", "normaliser", "warmup_utterances"):
        assert report[key]
    assert report["precision"] == "float32" and "close to, not identical" in report["normaliser"]
    assert len(stdout.splitlines()) == 1 and "composite" in stderr


def test_bench_reports_bad_input_and_missing_nemo(wav_dir, capsys):
    m = write(wav_dir / "m.jsonl", [{"audio_filepath": "audio/a1_yes.wav", "text": "x"}, "{"])
    assert rtfx.main(["--manifest", str(m)]) == 2
    assert f"{m}:2: not valid JSON" in capsys.readouterr().err
    if importlib.util.find_spec("nemo") is None:
        good = write(wav_dir / "g.jsonl", [{"audio_filepath": "audio/a1_yes.wav", "text": "x"}])
        assert rtfx.main(["--manifest", str(good), "--baseline", "nemo"]) == 2
        assert "needs nemo-toolkit" in capsys.readouterr().err


# ---- load generator against a stub server -------------------------------------------------------------------------

class Stub(BaseHTTPRequestHandler):
    """OpenAI-style transcription endpoint: every ``fail_every``-th request gets a 500, every ``sse_error_every``
    -th streamed one an SSE error event; the others two text deltas and a done event (or a JSON body)."""

    fail_every = sse_error_every = 0
    lock = threading.Lock()
    count = 0
    forms: ClassVar[list] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        msg = email.message_from_bytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        form = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.get_payload()}
        with Stub.lock:
            Stub.count += 1
            n = Stub.count
            Stub.forms.append(form)
        if self.path != "/v1/audio/transcriptions" or (self.fail_every and n % self.fail_every == 0):
            self.send_response(500)
            self.end_headers()
            return
        self.send_response(200)
        if form.get("stream") != b"true":
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"text": "hello world"}).encode())
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [{"type": "transcript.text.delta", "delta": "hello"}, {"type": "transcript.text.delta", "delta": " world"}]
        if self.sse_error_every and n % self.sse_error_every == 0:
            events.append({"error": {"message": "boom", "type": "server_error", "param": None, "code": "internal_error"}})
        else:
            events.append({"type": "transcript.text.done", "text": "hello world"})
        for e in events:
            self.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
            self.wfile.flush()


@pytest.fixture
def stub():
    Stub.count, Stub.forms, Stub.fail_every, Stub.sse_error_every = 0, [], 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)  # loopback only
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_multipart_body_parses_as_a_form():
    body, ctype = load.multipart({"model": "canary", "stream": "true"}, "a.wav", b"RIFF\x00\r\n--x\xff")
    msg = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
    assert parts["model"].get_payload(decode=True) == b"canary"
    assert parts["file"].get_filename() == "a.wav" and parts["file"].get_payload(decode=True) == b"RIFF\x00\r\n--x\xff"


def test_percentiles_known_values():
    p = load.percentiles([float(x) for x in range(1, 101)])
    assert p == {"p50": 50.5, "p90": 90.1, "p99": 99.01, "mean": 50.5}
    assert load.percentiles([]) is None


def requests_for(n: int, stream: bool):
    fields = {"model": "canary-qwen-2.5b", "response_format": "json", "stream": str(stream).lower()}
    return [(*load.multipart(fields, "a.wav", b"audio%d" % i), 2.0) for i in range(n)]


def test_fixed_concurrency_counts_answers_and_errors(stub):
    Stub.fail_every, Stub.sse_error_every = 4, 5  # of 12 requests: 4, 8, 12 fail; 5, 10 end with an error event
    lv = load.run_level(stub, requests_for(12, True), stream=True, timeout=30, concurrency=3)
    assert lv["requests"] == 12 and lv["ok"] == 7
    assert lv["errors"] == {"http_500": 3, "internal_error": 2}
    assert lv["latency_s"]["p50"] <= lv["latency_s"]["p90"] <= lv["latency_s"]["p99"]
    assert lv["ttft_s"]["p50"] <= lv["latency_s"]["p99"]
    assert lv["audio_s_per_s"] == pytest.approx(lv["throughput_per_s"] * 2.0, rel=1e-3)
    assert sorted(f["file"] for f in Stub.forms) == sorted(b"audio%d" % i for i in range(12))  # each sent once


def test_poisson_rate_without_streaming(stub):
    lv = load.run_level(stub, requests_for(6, False), stream=False, timeout=30, rate=200.0, seed=3)
    assert lv["mode"] == "poisson" and lv["offered_load_per_s"] == 200.0
    assert lv["ok"] == 6 and lv["errors"] == {} and lv["ttft_s"] is None
    assert all(f["stream"] == b"false" for f in Stub.forms)


def test_unreachable_server_is_an_error_not_a_crash():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lv = load.run_level(f"http://127.0.0.1:{port}", requests_for(2, True), stream=True, timeout=5, concurrency=1)
    assert lv["ok"] == 0 and lv["errors"] == {"ConnectionRefusedError": 2} and lv["latency_s"] is None


def test_bench_serve_writes_json_and_plot(stub, tmp_path, capsys):
    files = [str(TINY.audio_path(s)) for s in ("a1_yes", "a3_fox")]
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    argv = ["--url", stub, "--files", *files, "--concurrency", "1", "2", "--requests", "4", "--out", str(out),
            "--plot", str(png), "--label", "stub"]
    assert load.main(argv) == 0
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    assert all(lv["ok"] == 4 for lv in report["levels"]) and report["server"] == "stub"
    assert report["audio_s_per_request_mean"] == pytest.approx((0.3496 + 2.725) / 2, abs=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "c=2" in capsys.readouterr().err
    Stub.fail_every = 2
    assert load.main(argv[:-4]) == 1  # failures: exit code 1
    assert load.main(["--url", stub]) == 2  # no audio


def test_bench_names_a_file_that_fails(fixture_engine, tmp_path, capsys):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not audio")
    m = write(tmp_path / "m.jsonl", [{"audio_filepath": "garbage.wav", "duration": 1.0, "text": "x"}])
    assert rtfx.main(["--manifest", str(m), "--model", "m", "--repeats", "1"]) == 1
    assert "garbage.wav" in capsys.readouterr().err
