"""``parakeet_tdt`` next to ``canary_qwen`` in one Triton repository: ``canary-trt triton-repo`` writes it, and a
real tritonserver (the one nvidia-pytriton bundles, CPU-only) serves both models from one repository. Requests
to each, mixed on one gRPC stream, get their own model's answer: Parakeet-TDT's texts, token ids and word and
segment timestamps equal NeMo's ``transcribe(timestamps=True)`` goldens of tests/fixtures/tdt-tiny, Canary-Qwen's
texts and token ids its tiny-canary-qwen goldens. Streaming works and a bad input fails alone.

The server tests run in the separate venv .ci/run makes (.venv-triton) and skip elsewhere, as tests/test_triton.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serving_helpers import GATE_ENV, TINY, golden_text
from test_parakeet import NEMO, ROOT, utterances
from test_triton import SEPARATE_VENV, _engine_args, _inputs, _Stream, _text, serve_repository
from runtime.triton.repository import add_arguments, parakeet_kwargs, run, write_repository

HERE = Path(__file__).resolve().parent
WORD_KEYS = ("word", "start", "end", "start_offset", "end_offset")
SEGMENT_KEYS = ("segment", "start", "end", "start_offset", "end_offset")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([str(a) for a in argv]))


def _engine_param(repo: Path, name: str) -> dict:
    """The engine keywords a model's config.pbtxt carries (parameter "engine", a JSON string literal)."""
    text = (repo / name / "config.pbtxt").read_text()
    line = next(l for l in text.splitlines() if 'key: "engine"' in l)
    return json.loads(json.loads(line.split("string_value: ", 1)[1].rsplit(" }", 2)[0]))


# ---- canary-trt triton-repo ----------------------------------------------------------------------------------

def test_triton_repo_cli_writes_parakeet_tdt(tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert _cli(both, "--model", TINY.root / "model", "--parakeet", NEMO, "--max-batch-size", "4") == 0
    assert sorted(p.name for p in both.iterdir()) == ["canary_qwen", "parakeet_tdt"]
    assert (both / "parakeet_tdt" / "1" / "model.py").read_text() == (
        HERE.parent / "runtime" / "triton" / "models" / "parakeet_tdt.py").read_text()
    kw = _engine_param(both, "parakeet_tdt")
    assert kw == {"model": str(NEMO.resolve()), "device": "auto", "dtype": "auto", "encoder": "torch",
                  "artifacts": None, "max_batch_size": 4, "max_queue": 1024, "cuda_graphs": True}
    assert _engine_param(both, "canary_qwen")["model"] == str((TINY.root / "model").resolve())

    assert "engine_factory" not in (both / "parakeet_tdt" / "config.pbtxt").read_text()

    # A Parakeet-TDT --model: parakeet_tdt alone, with the encoder flags and the engine factory given.
    assert _cli(alone, "--model", NEMO, "--device", "cpu", "--encoder", "torch", "--engine-factory", "m:f") == 0
    assert sorted(p.name for p in alone.iterdir()) == ["parakeet_tdt"]
    assert _engine_param(alone, "parakeet_tdt")["device"] == "cpu"
    config = (alone / "parakeet_tdt" / "config.pbtxt").read_text()
    assert 'key: "engine_factory" value: { string_value: "m:f" }' in config

    assert _cli(tmp_path / "x", "--model", NEMO, "--engine-dir", tmp_path) == 2  # a Canary-Qwen decoder build
    assert _cli(tmp_path / "y", "--model", NEMO, "--parakeet", NEMO) == 2
    assert _cli(tmp_path / "z", "--model", TINY.root / "model", "--parakeet", TINY.root / "model") == 2
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_parakeet_tdt_config_parses_as_a_triton_model_config(tmp_path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason=SEPARATE_VENV)
    from google.protobuf import text_format

    assert _cli(tmp_path, "--model", TINY.root / "model", "--parakeet", NEMO, "--gpus", "0,1") == 0
    configs = {n: text_format.Parse((tmp_path / n / "config.pbtxt").read_text(), pb.ModelConfig())
               for n in ("canary_qwen", "parakeet_tdt")}
    cfg = configs["parakeet_tdt"]
    assert cfg.name == "parakeet_tdt" and cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    string = pb.DataType.Value("TYPE_STRING")
    assert {t.name: t.data_type for t in cfg.output} == {
        "TEXT": string, "TOKEN_IDS": pb.DataType.Value("TYPE_INT32"), "FINISH_REASON": string, "WORDS": string,
        "SEGMENTS": string}
    assert {t.name for t in cfg.input} == {"AUDIO", "SAMPLES", "SAMPLE_RATE", "STREAM"}
    assert {t.name for t in configs["canary_qwen"].input} == {"AUDIO", "SAMPLES", "SAMPLE_RATE", "STREAM",
                                                               "MAX_NEW_TOKENS"}
    for c in configs.values():  # the instance group applies to both engine models
        (group,) = c.instance_group
        assert (group.kind, group.count, list(group.gpus)) == (pb.ModelInstanceGroup.KIND_GPU, 1, [0, 1])


# ---- a real tritonserver -------------------------------------------------------------------------------------

def gated_parakeet(**kwargs):
    """parakeet_tdt's ``engine_factory`` in the cancellation test: ParakeetEngine.from_pretrained, whose decoding
    waits while the file named by $CANARY_TEST_GATE exists (at most 120 s), so a request stays in the engine
    until the test has cancelled it."""
    from serving_helpers import GATE_ENV

    from runtime.parakeet import ParakeetEngine

    engine = ParakeetEngine.from_pretrained(**kwargs)
    decode = engine.decoder.decode

    def gated(*args, **kw):
        deadline = time.monotonic() + 120
        while os.path.exists(os.environ[GATE_ENV]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return decode(*args, **kw)

    engine.decoder.decode = gated
    return engine


@pytest.fixture(scope="module")
def both_models(tmp_path_factory):
    """canary_qwen (the fixture engine, as tests/test_triton.py) and parakeet_tdt (its default factory,
    ParakeetEngine.from_pretrained on tdt-tiny's .nemo) in one repository, one tritonserver."""
    work = tmp_path_factory.mktemp("triton_parakeet")
    canary = _engine_args()
    names = write_repository(work / "models", canary, engine_factory="serving_helpers:engine_factory",
                             parakeet=parakeet_kwargs(canary, str(NEMO)))
    assert names == ["canary_qwen", "parakeet_tdt"]
    yield from serve_repository(work, work / "models")


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """parakeet_tdt alone through ``gated_parakeet``, verbose log (the model logs each request it takes)."""
    work = tmp_path_factory.mktemp("triton_parakeet_gated")
    write_repository(work / "models", None, parakeet=parakeet_kwargs(_engine_args(), str(NEMO)),
                     parakeet_factory="test_triton_parakeet:gated_parakeet")
    gate = work / "gate"
    for server in serve_repository(work, work / "models", env={GATE_ENV: str(gate)}, verbose=True):
        yield {**server, "gate": gate}


class _Models(_Stream):
    """tests/test_triton.py's gRPC stream, sending to the model named in each call."""

    def send(self, model: str, request_id: str, **kw) -> None:
        self.client.async_stream_infer(model, _inputs(self.grpcclient, **kw), request_id=request_id)


def _json(result, name: str) -> list[dict]:
    return json.loads(result.as_numpy(name)[0].decode())


def _check_parakeet(final, u: dict) -> None:
    ts = u["transcribe_single_timestamps"]  # NeMo 3.0's transcribe(timestamps=True), one utterance at a time
    assert _text(final) == ts["text"], u["id"]
    assert final.as_numpy("TOKEN_IDS").tolist() == ts["token_ids"], u["id"]
    assert final.as_numpy("FINISH_REASON")[0].decode() == "stop"
    assert _json(final, "WORDS") == [{k: w[k] for k in WORD_KEYS} for w in ts["word"]], u["id"]
    assert _json(final, "SEGMENTS") == [{k: s[k] for k in SEGMENT_KEYS} for s in ts["segment"]], u["id"]


def test_mixed_requests_each_get_their_own_models_answer(both_models):
    """Canary-Qwen and Parakeet-TDT requests interleaved on one gRPC stream, all in flight at once, bytes and
    float32 samples, streaming and not: each answer is its own model's golden."""
    s = _Models(both_models["grpc"])
    parakeet, canary = {}, {}
    try:
        for i in range(max(len(utterances()), len(TINY.stems))):
            u, stem = utterances()[i % len(utterances())], TINY.stems[i % len(TINY.stems)]
            stream = i % 2 == 0
            if i % 3 == 1:
                wave, rate = sf.read(str(ROOT / u["file"]), dtype="float32")
                s.send("parakeet_tdt", f"p{i}", samples=wave, rate=rate, stream=stream)
            else:
                s.send("parakeet_tdt", f"p{i}", audio=(ROOT / u["file"]).read_bytes(), stream=stream)
            s.send("canary_qwen", f"c{i}", audio=TINY.audio_path(stem).read_bytes(), stream=not stream)
            parakeet[f"p{i}"], canary[f"c{i}"] = (u, stream), stem
        got = s.until_final(len(parakeet) + len(canary))
    finally:
        s.client.stop_stream()
    for rid, (u, stream) in parakeet.items():
        *partial, final = got[rid]
        _check_parakeet(final, u)
        for p in partial:  # streamed: no final-only outputs in the pieces
            assert p.as_numpy("TOKEN_IDS") is None and p.as_numpy("WORDS") is None
        # TDT is not incremental: one piece, the whole text (an empty text sends none)
        assert [_text(p) for p in partial] == ([_text(final)] if stream and _text(final) else []), rid
    for rid, stem in canary.items():
        *partial, final = got[rid]
        assert _text(final) == golden_text(stem), rid
        ids = TINY.tensors[f"single.{stem}.gen_ids"].tolist()
        eos = TINY.meta["per_utterance"][stem]["single"]["eos_produced"]
        assert final.as_numpy("TOKEN_IDS").tolist() == (ids[:-1] if eos else ids), rid
        assert final.as_numpy("WORDS") is None  # Canary-Qwen has no timestamps
        if partial:
            assert "".join(_text(p) for p in partial) == _text(final), rid
    assert sum(len(got[r]) > 1 for r in canary) >= 2  # some Canary-Qwen requests did stream in pieces


def test_bad_input_to_parakeet_fails_alone(both_models):
    """A bad request to parakeet_tdt, sent between good requests to both models, fails with a clear error; the
    good ones get their answers and both models keep serving."""
    s = _Models(both_models["grpc"])
    u = utterances()[3]
    try:
        for bad, kw, message in (("not-audio", {"audio": b"this is not audio" * 20}, "cannot decode audio"),
                                 ("no-rate", {"samples": np.zeros(1600, np.float32), "rate": 0}, "sample rate")):
            s.send("parakeet_tdt", "before", audio=(ROOT / u["file"]).read_bytes(), stream=True)
            s.send("parakeet_tdt", bad, **kw)
            s.send("canary_qwen", "canary", audio=TINY.audio_path("a2_morning").read_bytes())
            s.send("parakeet_tdt", "after", audio=(ROOT / u["file"]).read_bytes())
            got, errors = {}, []
            deadline = time.monotonic() + 120
            while len(got) < 3 or not errors:  # three finals and one error, in any order
                result, error = s.responses.get(timeout=max(0.1, deadline - time.monotonic()))
                if error is not None:
                    errors.append(str(error))
                elif result.as_numpy("TOKEN_IDS") is not None:
                    got[result.get_response().id] = result
            assert len(errors) == 1 and "parakeet_tdt" in errors[0] and message in errors[0].lower(), errors
            _check_parakeet(got["before"], u)
            _check_parakeet(got["after"], u)
            assert _text(got["canary"]) == golden_text("a2_morning")
            assert s.responses.empty()
    finally:
        s.client.stop_stream()


def test_cancelled_request_is_dropped_and_the_model_keeps_serving(gated):
    """A request the client cancels while the engine holds it: the engine finishes it (TDT reports its text only
    at the end), the model logs the cancel and sends no answer, and the next request is served."""
    log = gated["log"]
    gated["gate"].touch()
    s = _Models(gated["grpc"])
    try:
        s.send("parakeet_tdt", "cancel-me", audio=(ROOT / utterances()[4]["file"]).read_bytes(), stream=True)
        deadline = time.monotonic() + 60
        while not (took := re.findall(r"parakeet_tdt: instance \S+ took request (\d+)", log.read_text())) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert took, "the model never took the request"
        (rid,) = took
        s.client.stop_stream(cancel_requests=True)
    finally:
        gated["gate"].unlink()
    deadline = time.monotonic() + 60
    while f"request {rid} cancelled after" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert f"parakeet_tdt: request {rid} cancelled by the client" in text
    assert f"parakeet_tdt: request {rid} cancelled after" in text  # the branch that sends no answer
    s2 = _Models(gated["grpc"])
    try:
        s2.send("parakeet_tdt", "after", audio=(ROOT / utterances()[1]["file"]).read_bytes())
        _check_parakeet(s2.until_final(1)["after"][-1], utterances()[1])
    finally:
        s2.client.stop_stream()
