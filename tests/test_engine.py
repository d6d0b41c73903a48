"""The in-flight batching engine reproduces NeMo's greedy ids whatever the schedule, and stays consistent
under cancellations, injected failures, back-pressure and shutdown."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest
import torch

from conftest import FIXTURES, Golden
from engine.backends.encoder import make_encoder
from engine.backends.encoder_torch import TorchEncoder
from engine.checkpoint import build_model, resolve
from runtime.audio import load_audio
from runtime.engine import Engine, EngineClosed, EngineOptions, QueueFull

TINY = Golden(FIXTURES / "tiny-canary-qwen")


def _TorchEncoder(model):  # noqa: N802  (other tests import it under this name)
    """The torch encoder stage of a loaded model."""
    return TorchEncoder(model.perception)


@pytest.fixture(scope="module")
def loaded():
    files = resolve(TINY.root / "model", TINY.root / "llm")
    model, tok = build_model(files)
    return model, tok, make_encoder("torch", model, files, None)


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    out = {}
    for stem in TINY.stems:
        ids = TINY.tensors[f"single.{stem}.gen_ids"].tolist()
        out[stem] = ids[:-1] if TINY.meta["per_utterance"][stem]["single"]["eos_produced"] else ids
    return out


def make_engine(loaded, encoder=None, threaded=False, **opts) -> Engine:
    model, tok, enc = loaded
    opts.setdefault("max_new_tokens", TINY.max_new_tokens)
    return Engine(model, tok, encoder or enc, options=EngineOptions(**opts), threaded=threaded)


def assert_idle_and_clean(engine: Engine) -> None:
    assert engine.scheduler.idle
    assert engine.allocator.used_blocks == 0
    assert not engine.decoder.running and not engine.decoder.pending
    assert not engine._requests and engine._queued == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_schedules_match_goldens(loaded, expected, seed):
    """Random arrival steps, batch limits (forcing slot reuse), a small KV pool (forcing waits) and
    cancellations: every uncancelled request gets NeMo's ids; a cancelled one a prefix of them."""
    rng = random.Random(seed)
    engine = make_engine(loaded, max_batch_size=rng.randint(1, 4), kv_block_size=rng.choice([1, 4, 16]),
                         kv_cache_tokens=rng.choice([150, 300, 2000]), max_prefill_tokens=rng.choice([50, 4096]),
                         refill_fraction=rng.choice([0.0, 0.25, 1.0]), encoder_batch_size=rng.choice([1, 3, 64]),
                         encode_ahead_mb=rng.choice([0.001, 512.0]))
    stems = [rng.choice(TINY.stems) for _ in range(9)]
    arrive = sorted(rng.randrange(0, 30) for _ in stems)
    cancel_at = {rng.randrange(len(stems)): rng.randrange(0, 40) for _ in range(2)}
    handles: list = [None] * len(stems)
    step = 0
    while step < 200 and (step <= max(arrive) or not engine.scheduler.idle):
        for i, t in enumerate(arrive):
            if t == step:
                handles[i] = engine.submit(TINY.audio_path(stems[i]))
        for i, t in cancel_at.items():
            if t == step and handles[i] is not None:
                handles[i].cancel()
        engine.step()
        step += 1
    assert_idle_and_clean(engine)
    for i, (stem, h) in enumerate(zip(stems, handles)):
        r = h.result(0)
        ref = expected[stem]
        if r.finish_reason == "cancelled":
            assert i in cancel_at and r.token_ids == ref[: len(r.token_ids)]
        else:
            assert r.token_ids == ref, (seed, stem)
            assert r.text == TINY.meta["per_utterance"][stem]["single"]["text"].strip()


def test_threads_and_asyncio_streams(loaded, expected):
    engine = make_engine(loaded, threaded=True, max_batch_size=3)
    results: dict = {}

    def worker(k):
        stems = TINY.stems[k:] + TINY.stems[:k]
        results[k] = [(s, engine.submit(TINY.audio_path(s)).result(60)) for s in stems]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()

    async def stream_all():
        async def one(stem):
            return stem, [d async for d in engine.stream(TINY.audio_path(stem))]
        return await asyncio.gather(*(one(s) for s in TINY.stems))

    streamed = asyncio.run(stream_all())
    for t in threads:
        t.join(60)
    for rows in results.values():
        for stem, r in rows:
            assert r.token_ids == expected[stem]
    for stem, deltas in streamed:
        assert "".join(deltas) == TINY.meta["per_utterance"][stem]["single"]["text"].strip()
        assert len(deltas) > 1 or len(expected[stem]) <= 1  # text arrives while decoding, not at the end
    engine.close(30)
    assert_idle_and_clean(engine)


class FaultyEncoder:
    """Wraps the real encoder; raises for utterances of one length (an injected fault)."""

    name = "torch"

    def __init__(self, inner, bad_len: int):
        self.inner, self.bad_len = inner, bad_len

    def encode(self, audio):
        if any(len(a) == self.bad_len for a in audio):
            raise RuntimeError("injected encoder fault")
        return self.inner.encode(audio)


def test_failing_request_fails_alone(loaded, expected):
    bad = TINY.stems[2]
    engine = make_engine(loaded, encoder=FaultyEncoder(loaded[2], len(load_audio(TINY.audio_path(bad)))))
    handles = {s: engine.submit(TINY.audio_path(s)) for s in TINY.stems}
    engine.run_until_idle()
    for s, h in handles.items():
        if s == bad:
            with pytest.raises(RuntimeError, match="injected encoder fault"):
                h.result(0)
        else:
            assert h.result(0).token_ids == expected[s]
    assert_idle_and_clean(engine)


def test_decoder_failure_fails_the_batch_and_engine_goes_on(loaded, expected):
    engine = make_engine(loaded)
    real_step, calls = engine.decoder.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected decoder fault")
        return real_step()

    engine.decoder.step = flaky_step
    first = [engine.submit(TINY.audio_path(s)) for s in TINY.stems[2:4]]
    engine.run_until_idle()
    for h in first:
        with pytest.raises(RuntimeError, match="injected decoder fault"):
            h.result(0)
    assert_idle_and_clean(engine)
    later = engine.submit(TINY.audio_path(TINY.stems[4]))
    engine.run_until_idle()
    assert later.result(0).token_ids == expected[TINY.stems[4]]


def test_back_pressure_limits_and_shutdown(loaded, expected):
    engine = make_engine(loaded, max_queue=2, max_seq_len=60)
    a = engine.submit(TINY.audio_path(TINY.stems[0]))
    engine.submit(TINY.audio_path(TINY.stems[1]))
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.submit(TINY.audio_path(TINY.stems[1]))
    with pytest.raises(ValueError, match="max_seq_len=60"):
        engine.submit(TINY.audio_path(TINY.stems[4]))  # 74 audio frames alone
    with pytest.raises(ValueError, match="empty"):
        engine.submit(np.zeros(0, np.float32), sample_rate=16000)
    engine.close()  # drains what was accepted
    assert a.result(0).token_ids == expected[TINY.stems[0]]
    with pytest.raises(EngineClosed):
        engine.submit(TINY.audio_path(TINY.stems[0]))
    assert_idle_and_clean(engine)


def test_engine_matches_reference_batched_generate(loaded):
    """Against the reference left-padded batch generator, on inputs without goldens (noise, tiny clip)."""
    model, tok, enc = loaded
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.05 for n in (100, 3000, 20000, 7777)]
    engine = make_engine(loaded, max_batch_size=2, max_new_tokens=12)
    handles = [engine.submit(w, sample_rate=16000) for w in waves]
    engine.run_until_idle()
    got = [h.result(0) for h in handles]
    from reference import reference_transcribe

    ref = reference_transcribe(model, tok, waves, max_new_tokens=12, batch_size=4)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.finish_reason for g in got] == [r.finish_reason for r in ref]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_equal_eager():
    files = resolve(TINY.root / "model", TINY.root / "llm")
    model, tok = build_model(files, dtype=torch.bfloat16, device="cuda")
    enc = make_encoder("torch", model, files, None)
    outs = []
    for graphs in (True, False):
        engine = Engine(model, tok, enc, options=EngineOptions(cuda_graphs=graphs, max_batch_size=8,
                                                                 max_new_tokens=24), threaded=False)
        assert bool(engine.decoder.graphs) == graphs
        hs = [engine.submit(TINY.audio_path(s)) for s in TINY.stems * 2]
        engine.run_until_idle()
        outs.append([h.result(0).token_ids for h in hs])
    assert outs[0] == outs[1]


def test_backend_reported_failure_fails_one_request(loaded, expected):
    """A backend that reports one request as failed (as TensorRT-LLM does, asynchronously): it fails alone."""
    engine = make_engine(loaded)
    real_step = engine.decoder.step
    engine.decoder.failed = {}

    def step():
        out = real_step()
        if engine.steps == 2:
            engine.decoder.failed[1] = "injected backend error"
            out.pop(1, None)
        return out

    engine.decoder.step = step
    handles = [engine.submit(TINY.audio_path(s)) for s in TINY.stems[2:5]]
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="decoder: injected backend error"):
        handles[1].result(0)
    assert handles[0].result(0).token_ids == expected[TINY.stems[2]]
    assert handles[2].result(0).token_ids == expected[TINY.stems[4]]
    assert_idle_and_clean(engine)


def test_map_keeps_order_reports_bad_inputs_and_waits_when_full(loaded, expected, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"garbage")
    engine = make_engine(loaded, threaded=True, max_queue=1, max_batch_size=2)
    inputs = [TINY.audio_path(s) for s in TINY.stems] + [bad] + [TINY.audio_path(TINY.stems[0])]
    out = list(engine.map(inputs))
    engine.close(30)
    assert [x for x, _ in out] == inputs
    for (x, r), stem in zip(out, TINY.stems + [None, TINY.stems[0]]):
        if stem is None:
            assert "bad.wav: cannot decode audio" in str(r)
        else:
            assert r.token_ids == expected[stem]
    with pytest.raises(Exception, match="bad.wav"):
        make_engine(loaded).transcribe([bad])
    assert_idle_and_clean(engine)


def test_postprocessing_failure_fails_one_request(loaded, expected):
    """A request whose text callback path raises inside postprocessing fails alone."""
    engine = make_engine(loaded)
    real_decode, bad = engine.tokenizer.decode, {}

    def decode(ids):
        if bad and ids[:1] == bad["first"]:
            raise RuntimeError("injected detokeniser fault")
        return real_decode(ids)

    handles = [engine.submit(TINY.audio_path(s), on_delta=lambda d: None) for s in TINY.stems[2:5]]
    bad["first"] = expected[TINY.stems[3]][:1]
    assert expected[TINY.stems[2]][:1] != bad["first"] != expected[TINY.stems[4]][:1]
    engine.tokenizer.decode = decode
    try:
        engine.run_until_idle()
    finally:
        engine.tokenizer.decode = real_decode
    with pytest.raises(RuntimeError, match="injected detokeniser fault"):
        handles[1].result(0)
    assert handles[0].result(0).token_ids == expected[TINY.stems[2]]
    assert handles[2].result(0).token_ids == expected[TINY.stems[4]]
    assert_idle_and_clean(engine)


def test_submit_stops_decoding_past_max_seq_len(loaded, tmp_path):
    import soundfile as sf

    from runtime.audio import AudioTooLong

    path = tmp_path / "long.flac"
    sf.write(str(path), np.zeros(16000 * 30, np.float32), 16000)  # 30 s of silence: a few KB of FLAC
    engine = make_engine(loaded, max_seq_len=100)  # 100 tokens hold at most 8 s of audio
    with pytest.raises(AudioTooLong, match="long.flac: audio is longer than .* max_seq_len=100"):
        engine.submit(path)


class ScriptedDecoder:
    """A decoder backend that plays a script per request: the tokens of each step, and its verdict."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.failed, self.finished, self.logprobs = script, {}, {}, {}
        self.live: dict[int, list] = {}

    def add(self, req):
        self.live[req.request_id] = list(self.script(req.request_id))

    def step(self):
        out = {}
        for rid, steps in list(self.live.items()):
            if not steps:
                continue
            tokens, verdict = steps.pop(0)
            out[rid] = tokens
            self.logprobs[rid] = [-0.5] * len(tokens)
            if verdict:
                self.finished[rid] = verdict
        return out

    def release(self, rid):
        self.live.pop(rid, None)


def run_scripted(loaded, script, max_new_tokens=4, n=1):
    model, tok, enc = loaded
    engine = Engine(model, tok, enc, decoder=ScriptedDecoder(script),
                    options=EngineOptions(max_new_tokens=max_new_tokens), threaded=False)
    handles = [engine.submit(TINY.audio_path(TINY.stems[0])) for _ in range(n)]
    for _ in range(50):  # a bounded loop: the engine must never keep a request it cannot finish
        engine.step()
        if engine.scheduler.idle:
            break
    assert engine.scheduler.idle and engine.allocator.used_blocks == 0 and not engine._requests
    return engine, handles


def test_engine_retires_requests_on_the_decoders_verdict(loaded):
    eos = loaded[1].eos_id
    _, [h] = run_scripted(loaded, lambda rid: [([5], None), ([6, eos], "stop")])
    r = h.result(0)
    assert (r.token_ids, r.finish_reason, r.logprobs) == ([5, 6], "stop", [-0.5, -0.5])
    _, [h] = run_scripted(loaded, lambda rid: [([5], None), ([6, 7], "length")], max_new_tokens=3)
    assert (h.result(0).token_ids, h.result(0).finish_reason) == ([5, 6, 7], "length")


@pytest.mark.parametrize("case", ["eos_without_verdict", "stop_on_other_token", "past_limit", "unknown_reason"])
def test_decoder_and_tokenizer_disagreeing_fails_the_request_loudly(loaded, case):
    """A decoder whose idea of eos (or of the limit) differs from the tokenizer's: the request fails with a
    message saying so, the engine goes idle (no endless decoding), and other requests are unaffected."""
    eos = loaded[1].eos_id
    scripts = {
        "eos_without_verdict": [([5], None), ([eos], None), ([8], None), ([9], "length")],
        "stop_on_other_token": [([5], None), ([7], "stop")],
        "past_limit": [([5, 6], None), ([7, 8, 9], None)],
        "unknown_reason": [([5], "done")],
    }
    good = [([3], None), ([eos], "stop")]
    _, handles = run_scripted(loaded, lambda rid: scripts[case] if rid == 0 else good, n=2)
    with pytest.raises(RuntimeError, match="decoder"):
        handles[0].result(0)
    assert handles[1].result(0).token_ids == [3]
