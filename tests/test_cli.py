"""``canary-trt`` run as a subprocess, as a user runs it: Ctrl-C, folders and manifests, output files that are
never overwritten silently, clear errors before any model is loaded, ``serve`` checking its port first, and
decoder chatter kept out of the log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import FIXTURES, Golden

TINY = Golden(FIXTURES / "tiny-canary-qwen")
ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model", str(TINY.root / "model"), "--llm", str(TINY.root / "llm"), "--device", "cpu",
         "--max-new-tokens", str(TINY.max_new_tokens)]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1"}


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=ROOT)


def text_of(stem: str) -> str:
    return TINY.meta["per_utterance"][stem]["single"]["text"].strip()


# The CLI with its engine's encoder held, once 8 clips are encoded, while the file $GATE exists: the run is then
# certainly under way, with results already written, when the test presses Ctrl-C. Only the loader is
# patched; everything the test looks at is the real CLI.
HELD = textwrap.dedent("""
    import os, sys, time
    from runtime.engine import Engine
    load = Engine.from_pretrained.__func__
    def held(cls, **kw):
        engine = load(cls, **kw)
        inner, calls = engine.encoder.encode, []
        def encode(audio):
            while sum(calls) >= 8 and len(audio) and os.path.exists(os.environ["GATE"]):
                time.sleep(0.02)
            calls.append(len(audio))
            return inner(audio)
        engine.encoder.encode = encode
        return engine
    Engine.from_pretrained = classmethod(held)
    from runtime.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def held_cli(tmp_path, files):
    gate = tmp_path / "gate"
    gate.touch()
    # a running batch of 4: admission never needs more than the first encoder batch (up to 64 clips) holds
    proc = subprocess.Popen([sys.executable, "-c", HELD, "transcribe", *files, *MODEL, "--output-format", "jsonl",
                             "--max-batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**ENV, "GATE": str(gate)})
    return proc, gate


def test_ctrl_c_cancels_keeps_what_is_done_and_exits_130(tmp_path):
    """80 inputs; the encoder's first batch is transcribed, the rest held. Ctrl-C once the first result is
    out: the process cancels what is outstanding and exits 130 without a traceback, and what it printed is a
    correct prefix of the inputs, shorter than all of them."""
    stems = TINY.stems * 16
    files = [str(TINY.audio_path(s)) for s in stems]
    proc, gate = held_cli(tmp_path, files)
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "cancelling" not in (line := proc.stderr.readline()):  # the handler has run
            assert line and time.monotonic() < deadline, "no interrupt message"
        gate.unlink()  # the held batch may end now: it is cancelled, not transcribed
        proc.wait(120)
        out, err = proc.stdout.read(), proc.stderr.read()  # (through the buffers readline filled)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted:" in err
    rows = [json.loads(line) for line in [first, *out.splitlines()]]
    assert 1 <= len(rows) < len(files)
    assert [r["audio"] for r in rows] == files[: len(rows)]
    assert [r["text"] for r in rows] == [text_of(s) for s in stems[: len(rows)]]
    assert f"interrupted: {len(rows)} of {len(files)} inputs transcribed" in err


def test_second_ctrl_c_exits_at_once(tmp_path):
    files = [str(TINY.audio_path(s)) for s in TINY.stems * 16]
    proc, gate = held_cli(tmp_path, files)
    try:
        assert proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        while "cancelling" not in proc.stderr.readline():
            pass
        proc.send_signal(signal.SIGINT)  # the encoder is still held: only an immediate exit ends the process
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.unlink(missing_ok=True)


def test_folders_output_dir_and_overwrite(tmp_path):
    """A folder's audio files in path order, one SRT each under --output-dir with the folder's layout; a
    second run refuses to overwrite (exit 2, files untouched) unless --overwrite."""
    src = tmp_path / "in"
    (src / "b").mkdir(parents=True)
    for name, stem in (("z.wav", "a1_yes"), ("b/a.wav", "a3_fox")):
        (src / name).write_bytes(TINY.audio_path(stem).read_bytes())
    (src / "notes.txt").write_text("not audio")
    out = tmp_path / "out"
    r = cli("transcribe", str(src), *MODEL, "--output-format", "srt", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["b/a.srt", "z.srt"]
    srt = (out / "b" / "a.srt").read_text()
    assert srt.startswith("1\n00:00:00,") and text_of("a3_fox") in srt
    assert r.stderr.index(str(src / "b" / "a.wav")) < r.stderr.index(str(src / "z.wav"))  # sorted by path
    (out / "z.srt").write_text("mine")
    again = cli("transcribe", str(src), *MODEL, "--output-format", "srt", "--output-dir", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    assert (out / "z.srt").read_text() == "mine"
    forced = cli("transcribe", str(src), *MODEL, "--output-format", "srt", "--output-dir", str(out), "--overwrite")
    assert forced.returncode == 0 and text_of("a1_yes") in (out / "z.srt").read_text()
    several = cli("transcribe", str(src / "z.wav"), str(src / "b" / "a.wav"), *MODEL, "--output-format", "vtt")
    assert several.returncode == 2 and "--output-dir" in several.stderr


def test_manifest_in_and_out(tmp_path):
    """--manifest rows (relative paths against the manifest's folder) in, --output-manifest rows out: each
    input row with pred_text added, in order."""
    rows = [{"audio_filepath": f"audio/{s}.wav", "duration": 1.0, "text": "ref", "speaker": i}
            for i, s in enumerate(["a2_morning", "a5_numbers"])]
    manifest = TINY.root / "manifest_for_cli_test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        pred = tmp_path / "pred.jsonl"
        r = cli("transcribe", "--manifest", str(manifest), *MODEL, "--output-manifest", str(pred))
        assert r.returncode == 0, r.stderr
        got = [json.loads(line) for line in pred.read_text().splitlines()]
        assert got == [{**row, "pred_text": text_of(row["audio_filepath"][6:-4])} for row in rows]
        again = cli("transcribe", "--manifest", str(manifest), *MODEL, "--output-manifest", str(pred))
        assert again.returncode == 2 and "exists" in again.stderr
    finally:
        manifest.unlink()


def test_clear_errors_before_loading(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("transcribe", str(empty), *MODEL)
    assert r.returncode == 2 and "no audio files" in r.stderr and "no such file" not in r.stderr
    r = cli("transcribe", str(tmp_path / "missing.wav"), *MODEL)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    wav = str(TINY.audio_path("a1_yes"))
    r = cli("transcribe", wav, "--model", str(TINY.root / "model" / "model.safetensors"))
    assert r.returncode == 2 and "is a file" in r.stderr and "config.json" in r.stderr, r.stderr
    r = cli("transcribe", wav, "--model", str(TINY.root / "model"), "--device", "cpu")  # no --llm, offline
    assert r.returncode == 2 and "pass --llm DIR or set HF_HUB_OFFLINE=0" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_missing_extras_are_named():
    from runtime.checks import UsageError, require

    with pytest.raises(UsageError, match=r"--plot needs matplotlib_not_here"):
        require("matplotlib_not_here", what="--plot")
    with pytest.raises(UsageError, match=r"pip install 'canary-trt\[onnx\]'"):
        import runtime.checks as c

        c.EXTRAS["onnx_missing_for_test"] = "onnx"
        try:
            require("onnx_missing_for_test", what="--encoder onnx")
        finally:
            del c.EXTRAS["onnx_missing_for_test"]


def test_serve_checks_the_port_before_loading_the_model():
    """With the port taken, serve fails at once with a message about the port, not about the (missing) model:
    the model was never loaded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--model", "/no/such/model", "--port", str(port), timeout=120)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "cannot load the model" not in r.stderr


def test_decoder_chatter_is_counted_not_printed(tmp_path):
    """A damaged MP3 makes libmpg123 print a line per bad frame on fd 2; under quiet_decoder_logs the first
    is logged once, the rest counted, and other native output passes unchanged."""
    buf = tmp_path / "ok.mp3"
    wave = (0.3 * np.sin(np.arange(16000 * 20) / 10)).astype(np.float32)
    try:
        sf.write(buf, wave, 16000, format="MP3")
    except (sf.LibsndfileError, ValueError, TypeError):
        pytest.skip("this libsndfile cannot write MP3")
    data = bytearray(buf.read_bytes())
    for i in np.random.default_rng(0).integers(2000, len(data), 300):
        data[i] ^= 0xFF
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(bytes(data))
    script = textwrap.dedent(f"""
        import logging, os, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        from runtime.audio import load_audio, quiet_decoder_logs
        restore = quiet_decoder_logs()
        os.write(2, b"a native line\\n")
        load_audio({str(bad)!r})
        restore()
    """)
    loud = subprocess.run([sys.executable, "-c", f"from runtime.audio import load_audio; load_audio({str(bad)!r})"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    chatter = [line for line in loud.stderr.splitlines() if line.startswith(("Note:", "[src/libmpg123"))]
    if len(chatter) < 3:
        pytest.skip("this libmpg123 reports too little about the damaged frames")
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=ROOT,
                           timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert "a native line" in lines
    assert sum(chatter[0] in line for line in lines) == 1  # the first, once, through logging
    assert f"reported {len(chatter) - 1} more damaged-frame messages" in quiet.stderr
    assert len(lines) <= 4


def test_bench_and_transcribe_agree_on_max_new_tokens():
    from runtime.cli import build_parser

    parser = build_parser()
    wav = str(TINY.audio_path("a1_yes"))
    bench = parser.parse_args(["bench", "--manifest", "m.jsonl"])
    assert bench.max_new_tokens == parser.parse_args(["transcribe", wav]).max_new_tokens == 256
