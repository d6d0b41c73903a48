"""Triton integration: the generated repository's configs parse as Triton ModelConfigs, the ensemble's Python
logic reproduces the model's own prompt and embeddings, and a real tritonserver (the one nvidia-pytriton
bundles, CPU-only) serves the generated ``canary_qwen`` and ensemble pre/post-processing models to tritonclient.

nvidia-pytriton needs numpy < 2 and tritonclient protobuf < 7, which the main test environment does not
have: the server tests run in the separate venv .ci/run makes (.venv-triton) and skip elsewhere, saying so.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serving_helpers import TINY, golden_text
from runtime.options import engine_kwargs
from runtime.triton.repository import write_repository

HERE = Path(__file__).resolve().parent
SEPARATE_VENV = "runs in the separate venv that .ci/run makes (.venv-triton: numpy<2, nvidia-pytriton, tritonclient)"


def _engine_args(**over) -> dict:
    from argparse import Namespace

    args = Namespace(model=TINY.root / "model", llm=TINY.root / "llm", device="cpu", dtype="float32", merge_lora=False,
                     encoder="torch", artifacts=None, engine_dir=None, max_batch_size=8, max_queue=64,
                     max_seq_len=1024, max_new_tokens=TINY.max_new_tokens, kv_cache_tokens=None, no_cuda_graphs=True)
    for k, v in over.items():
        setattr(args, k, v)
    return engine_kwargs(args)


# ---- configs -------------------------------------------------------------------------------------------------

def decoder_build(out: Path, dtype: str = "bfloat16") -> Path:
    """A real decoder_meta.json (and hf/ + trtllm_ckpt/) of the fixture, without an engine."""
    from engine.checkpoint import resolve
    from engine.export.trtllm import export_decoder

    export_decoder(resolve(TINY.root / "model", TINY.root / "llm"), out, dtype, max_batch_size=8,
                   max_audio_seconds=8.0, max_new_tokens=TINY.max_new_tokens, skip_engine=True)
    return out


def test_configs_parse_as_triton_model_configs(tmp_path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason=SEPARATE_VENV)
    from google.protobuf import text_format

    names = write_repository(tmp_path, _engine_args(no_cuda_graphs=False), engine_dir=decoder_build(tmp_path / "decoder"))
    assert names == ["canary_qwen", "ensemble", "multimodal_encoders", "postprocessing", "preprocessing",
                     "tensorrt_llm"]
    configs = {n: text_format.Parse((tmp_path / n / "config.pbtxt").read_text(), pb.ModelConfig()) for n in names}
    for name, cfg in configs.items():
        assert cfg.name == name
        assert (tmp_path / name / "1").is_dir()
        if cfg.backend == "python":
            assert (tmp_path / name / "1" / "model.py").is_file()
    assert configs["canary_qwen"].model_transaction_policy.decoupled
    assert configs["tensorrt_llm"].model_transaction_policy.decoupled
    trt = configs["tensorrt_llm"]
    assert trt.parameters["gpt_model_path"].string_value == str((tmp_path / "decoder" / "engine").resolve())
    assert trt.parameters["enable_kv_cache_reuse"].string_value == "true"  # bf16: built with paged context FMHA
    assert trt.parameters["cuda_graph_mode"].string_value == "true"
    assert trt.parameters["cuda_graph_cache_size"].string_value == "8"  # one graph per batch size
    table = pb.DataType.Value("TYPE_BF16")  # the build's dtype, at both ends of the edge
    assert {t.name: t.data_type for t in trt.input}["prompt_embedding_table"] == table
    assert {t.name: t.data_type for t in configs["multimodal_encoders"].output}["OUT_PROMPT_EMBEDDING_TABLE"] == table
    # Every tensor the ensemble maps exists, with the same type, at both ends of each edge.
    types = {(n, t.name): t.data_type for n, c in configs.items() for t in list(c.input) + list(c.output)}
    ens = configs["ensemble"]
    produced = {t.name: types[("ensemble", t.name)] for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        for key, value in step.input_map.items():
            assert produced[value] == types[(step.model_name, key)], (step.model_name, key)
        for key, value in step.output_map.items():
            produced[value] = types[(step.model_name, key)]
    assert {t.name for t in ens.output} <= set(produced)
    engine = configs["canary_qwen"].parameters["engine"].string_value
    assert '"decoder": "trtllm"' in engine and str(TINY.root / "model") in engine


# ---- the ensemble's Python logic (any environment) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from engine.checkpoint import build_model, resolve

    return build_model(resolve(TINY.root / "model", TINY.root / "llm"))


def test_preprocessing_fake_ids_reproduce_the_spliced_prompt(tiny_model):
    """Fake ids looked up in the encoder's table (as the tensorrt_llm backend does) give exactly the embeddings
    the model splices for the same audio: right span, right length, right order."""
    from runtime.triton.ensemble import AudioEncoder, Preprocessor, load_config
    from test_engine import _TorchEncoder

    model, tok = tiny_model
    pre = Preprocessor(*load_config(str(TINY.root / "model"), str(TINY.root / "llm")))
    encode = AudioEncoder(_TorchEncoder(model))
    vocab = model.cfg.llm.vocab_size
    keys = set()
    for stem in ("a1_yes", "a4_stella"):
        out = pre(TINY.audio_path(stem).read_bytes())
        ids = torch.from_numpy(out["INPUT_ID"].astype(np.int64))
        (table, frames), = encode([out["AUDIO_SAMPLES"]])
        assert frames == table.shape[0] == int((ids >= vocab).sum())
        assert out["REQUEST_INPUT_LEN"][0] == len(ids)
        embeds = model.embed_tokens(ids.clamp(max=vocab - 1))
        assert table.dtype == model.dtype  # the engine's dtype (float32 here), not a fixed fp16
        embeds[ids >= vocab] = table[ids[ids >= vocab] - vocab]
        emb = model.perception(torch.from_numpy(out["AUDIO_SAMPLES"])[None], torch.tensor([len(out["AUDIO_SAMPLES"])]))[-1][0]
        ref, _ = model.splice([tok.prompt_ids()], tok.audio_id, [emb])
        assert torch.allclose(embeds, ref[0], atol=1e-5)
        extra = out["OUT_PROMPT_TABLE_EXTRA_IDS"]
        assert len(extra) == len(ids) and set(extra[(ids < vocab).numpy()]) == {0}
        keys.add(int(extra[(ids >= vocab).numpy()][0]))
    assert len(keys) == 2 and 0 not in keys  # different audio, different nonzero keys


def test_postprocessing_detokenizes_up_to_the_length():
    from runtime.triton.ensemble import detokenize, load_config

    _, tok = load_config(str(TINY.root / "model"), str(TINY.root / "llm"))
    ids = TINY.tensors["single.a1_yes.gen_ids"].tolist()
    tokens = np.array([ids + [tok.pad_id] * 5], np.int32)  # one beam, padded past its length
    assert detokenize(tok, tokens, np.array([len(ids)])) == [TINY.meta["per_utterance"]["a1_yes"]["single"]["text"]]
    assert detokenize(tok, tokens, np.array([3])) == [tok.decode(ids[:3])]


# ---- a real tritonserver ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tritonserver(tmp_path_factory):
    """pytriton's bundled tritonserver on 127.0.0.1 serving the generated repository (canary_qwen with the
    fixture engine, plus the ensemble's pre/post-processing models)."""
    pytest.importorskip("tritonclient.grpc", reason=SEPARATE_VENV)
    pytest.importorskip("pytriton.triton", reason=SEPARATE_VENV)
    work = tmp_path_factory.mktemp("triton")
    repo = work / "models"
    write_repository(repo, _engine_args(), engine_dir=decoder_build(work / "decoder"))
    for name in ("tensorrt_llm", "ensemble"):  # TensorRT-LLM: not here
        shutil.rmtree(repo / name)
    # canary_qwen again, on the torch decoder (no TensorRT-LLM engine here) and the fixture engine
    write_repository(repo, _engine_args(), engine_factory="serving_helpers:engine_factory")
    yield from serve_repository(work, repo)


def serve_repository(work: Path, repo: Path, env: dict | None = None, verbose: bool = False):
    """pytriton's bundled tritonserver on 127.0.0.1 serving ``repo`` (shared by the tests/test_triton*.py), until
    the generator is closed. Yields the gRPC address, an HTTP client and the log's path."""
    pytest.importorskip("tritonclient.grpc", reason=SEPARATE_VENV)
    pytriton = pytest.importorskip("pytriton.triton", reason=SEPARATE_VENV)
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    server = work / "tritonserver"  # the stub for this Python next to the backend, as pytriton arranges it
    shutil.copytree(pytriton.TRITONSERVER_DIST_DIR, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                server / "backends" / "python" / "triton_python_backend_stub")
    http, grpc, metrics = _free_port(), _free_port(), _free_port()
    env = {**os.environ, **(env or {})}
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(get_libs_path()), sysconfig.get_config_var("LIBDIR"),
                                                    env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = ":".join([str(HERE), str(HERE.parent), *sys.path[1:]])
    log_path = work / "tritonserver.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(server / "bin" / "tritonserver"), f"--model-repository={repo}",
         f"--backend-directory={server / 'backends'}", f"--cache-directory={server / 'caches'}",
         "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
         "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
         "--log-verbose=1" if verbose else "--log-info=true", "--exit-on-error=true"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tritonserver did not become ready:\n{log_path.read_text()[-5000:]}")
        try:
            if client.is_server_ready():
                break
        except Exception:
            pass
        time.sleep(0.5)
    yield {"grpc": f"127.0.0.1:{grpc}", "http": client, "log": log_path}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def _inputs(grpcclient, audio: bytes | None = None, samples: np.ndarray | None = None, rate: int = 16000,
            stream: bool = False, max_new_tokens: int | None = None):
    inputs = []

    def add(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)

    if audio is not None:
        add("AUDIO", np.array([audio], dtype=np.object_), "BYTES")
    if samples is not None:
        add("SAMPLES", samples.astype(np.float32), "FP32")
        add("SAMPLE_RATE", np.array([rate], np.int32), "INT32")
    add("STREAM", np.array([stream]), "BOOL")
    if max_new_tokens is not None:
        add("MAX_NEW_TOKENS", np.array([max_new_tokens], np.int32), "INT32")
    return inputs


class _Stream:
    """A gRPC bidirectional stream collecting (result, error) pairs per request id."""

    def __init__(self, url):
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, request_id: str, **kw) -> None:
        self.client.async_stream_infer("canary_qwen", _inputs(self.grpcclient, **kw), request_id=request_id)

    def until_final(self, n: int, timeout: float = 120) -> dict[str, list]:
        """Collect responses until ``n`` requests have their final (TOKEN_IDS) response or an error."""
        got: dict[str, list] = {}
        done = 0
        deadline = time.monotonic() + timeout
        while done < n:
            result, error = self.responses.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise AssertionError(f"error response: {error}")
            rid = result.get_response().id
            got.setdefault(rid, []).append(result)
            done += result.as_numpy("TOKEN_IDS") is not None
        return got


def _text(result) -> str:
    return result.as_numpy("TEXT")[0].decode()


def test_canary_qwen_in_tritonserver(tritonserver):
    """Bytes and float32 samples, streaming and not, many at once over one gRPC stream: the goldens' texts."""
    import soundfile as sf

    s = _Stream(tritonserver["grpc"])
    try:
        expected = {}
        for i, stem in enumerate(TINY.stems * 2):
            rid = f"{stem}-{i}"
            expected[rid] = stem
            if i % 2:
                wave, rate = sf.read(str(TINY.audio_path(stem)), dtype="float32")
                s.send(rid, samples=wave, rate=rate, stream=i % 4 == 1)
            else:
                s.send(rid, audio=TINY.audio_path(stem).read_bytes(), stream=i % 4 == 0)
        got = s.until_final(len(expected))
        streamed = 0
        for rid, stem in expected.items():
            *partial, final = got[rid]
            assert _text(final) == golden_text(stem), rid
            ids = TINY.tensors[f"single.{stem}.gen_ids"].tolist()
            eos = TINY.meta["per_utterance"][stem]["single"]["eos_produced"]
            assert final.as_numpy("TOKEN_IDS").tolist() == (ids[:-1] if eos else ids)
            assert final.as_numpy("FINISH_REASON")[0].decode() in ("stop", "length")
            if partial:
                streamed += 1
                assert "".join(_text(p) for p in partial) == _text(final)
        assert streamed >= 3  # the streaming requests with more than one piece of text did stream
    finally:
        s.client.stop_stream()


def test_bad_input_fails_alone_and_the_model_keeps_serving(tritonserver):
    s = _Stream(tritonserver["grpc"])
    try:
        s.send("bad", audio=b"this is not audio" * 20)
        result, error = s.responses.get(timeout=60)
        assert result is None and "cannot decode audio" in str(error)
        s.send("good", audio=TINY.audio_path("a2_morning").read_bytes())
        assert _text(s.until_final(1)["good"][-1]) == golden_text("a2_morning")
    finally:
        s.client.stop_stream()


def test_cancelled_stream_cancels_the_request_in_the_engine(tritonserver):
    """A long streaming request is cancelled by the client after its first piece: the model logs the cancel and
    frees the request; the server then serves the next request correctly."""
    s = _Stream(tritonserver["grpc"])
    # a5 never ends its turn with this random model: 900 new tokens keep it running far past the cancel
    s.send("long", audio=TINY.audio_path("a5_numbers").read_bytes(), stream=True, max_new_tokens=900)
    result, error = s.responses.get(timeout=60)
    assert error is None and result.as_numpy("TOKEN_IDS") is None  # a partial response: it is running
    s.client.stop_stream(cancel_requests=True)
    log = tritonserver["log"]
    deadline = time.monotonic() + 60
    while "cancelled after" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [l for l in log.read_text().splitlines() if "cancelled after" in l]
    assert lines and int(lines[-1].split("cancelled after ")[1].split()[0]) < 900
    s2 = _Stream(tritonserver["grpc"])
    try:
        s2.send("after", audio=TINY.audio_path("a3_fox").read_bytes())
        assert _text(s2.until_final(1)["after"][-1]) == golden_text("a3_fox")
    finally:
        s2.client.stop_stream()


def test_ensemble_python_models_in_tritonserver(tritonserver):
    """The ensemble's preprocessing and postprocessing models, loaded by tritonserver, give what the logic gives."""
    import tritonclient.http as httpclient

    from runtime.triton.ensemble import Preprocessor, load_config

    cfg, tok = load_config(str(TINY.root / "model"), str(TINY.root / "llm"))
    audio = TINY.audio_path("a3_fox").read_bytes()
    inp = httpclient.InferInput("AUDIO", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[audio]], dtype=np.object_))
    got = tritonserver["http"].infer("preprocessing", [inp])
    for name, want in Preprocessor(cfg, tok)(audio).items():
        assert np.array_equal(got.as_numpy(name)[0], want), name
    assert got.as_numpy("REQUEST_OUTPUT_LEN")[0, 0] == TINY.max_new_tokens

    ids = TINY.tensors["single.a3_fox.gen_ids"].tolist()
    tokens = httpclient.InferInput("TOKENS_BATCH", [1, 1, len(ids)], "INT32")
    tokens.set_data_from_numpy(np.array([[ids]], np.int32))
    lengths = httpclient.InferInput("SEQUENCE_LENGTH", [1, 1], "INT32")
    lengths.set_data_from_numpy(np.array([[len(ids)]], np.int32))
    text = tritonserver["http"].infer("postprocessing", [tokens, lengths]).as_numpy("TEXT")
    assert text[0, 0].decode() == TINY.meta["per_utterance"]["a3_fox"]["single"]["text"]


def test_multimodal_encoders_sends_a_bf16_table_through_dlpack(tritonserver):
    """The encoder model, loaded by tritonserver, emits the engine's bf16 table (the dtype TensorRT-LLM checks)
    with NeMo's embedding values, through DLPack (numpy has no bfloat16)."""
    import tritonclient.http as httpclient

    wave = TINY.audio("a3_fox").numpy()
    inp = httpclient.InferInput("AUDIO_SAMPLES", [1, len(wave)], "FP32")
    inp.set_data_from_numpy(wave[None])
    got = tritonserver["http"].infer("multimodal_encoders", [inp])
    out = got.get_output("OUT_PROMPT_EMBEDDING_TABLE")
    assert out["datatype"] == "BF16"
    table = got.as_numpy("OUT_PROMPT_EMBEDDING_TABLE")[0].astype(np.float32)
    frames = TINY.tensors["single.a3_fox.proj_lens"].item()
    want = TINY.tensors["single.a3_fox.proj"][0, :frames]  # NeMo's rows past the length are padding
    assert got.as_numpy("OUT_PROMPT_VOCAB_SIZE")[0, 0] == table.shape[0] == frames
    assert ((torch.from_numpy(table) - want).abs().max() / want.abs().max()).item() < 2e-2  # bf16 vs fp32


def test_triton_repo_cli_writes_canary_qwen(tmp_path, capsys):
    import argparse

    from runtime.triton.repository import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "repo"
    assert run(parser.parse_args([str(out), "--model", str(TINY.root / "model"), "--max-new-tokens", "7"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["canary_qwen"]
    assert (out / "canary_qwen" / "1" / "model.py").read_text() == (
        Path(__file__).parent.parent / "runtime" / "triton" / "models" / "canary_qwen.py").read_text()
    assert '\\"max_new_tokens\\": 7' in (out / "canary_qwen" / "config.pbtxt").read_text()
    assert str(out) in capsys.readouterr().out
    assert run(parser.parse_args([str(out), "--engine-dir", str(tmp_path / "missing")])) == 2  # no build there
