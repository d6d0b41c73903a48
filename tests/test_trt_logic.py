"""The plain-Python logic around TensorRT, TensorRT-LLM and the Triton ensemble, on CPU: profile choice (padding a
batch up to a profile's minimum, best fit), host-side encoder lengths, embeddings in the LLM's dtype, the
frontend's NaN-free std and trimmed DFT kernel, per-operator dtype checks, TF32 and version gates, executor
finish reasons, and the generated Triton configs (table dtype from decoder_meta.json, CUDA graph cache, KV
cache arithmetic). References: NeMo's goldens, the exact torch modules, and the torch decoder's own KV sizing.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

from conftest import FIXTURES, Golden, pad_batch, rel_err
from engine.backends.decoder_trtllm import EngineInfo, finish_verdict, stream_ordered
from engine.backends.encoder import make_encoder
from engine.backends.encoder_base import length_batches, output_frames
from engine.backends.encoder_tensorrt import pick_profile, rows_for
from engine.backends.encoder_torch import TorchEncoder
from engine.checkpoint import build_model, resolve
from engine.export.tensorrt import check_graph, check_tensorrt_version, fp32_plan_warning, tf32_cleared
from engine.export.trtllm import DecoderBuildError, export_decoder, read_metadata, require_trtllm, trtllm_version_problem
from engine.frontend import ConvMelFrontend, dft_basis, normalize_per_feature

TINY = Golden(FIXTURES / "tiny-canary-qwen")


@pytest.fixture(scope="module")
def files():
    return resolve(TINY.root / "model", TINY.root / "llm")


@pytest.fixture(scope="module")
def model(files):
    return build_model(files)[0]


# ---- TensorRT profile choice -----------------------------------------------------------------------------

PROFILES = [(1, 64, 1600, 160000), (4, 16, 1600, 640000)]  # (batch lo, hi, width lo, hi): short x 64, long x 16


def test_profile_choice_pads_and_fits_best():
    assert pick_profile(PROFILES, 1, 16000) == (0, 1, 16000)  # only the first takes one row
    assert pick_profile(PROFILES, 8, 400000) == (1, 8, 400000)  # only the second is that wide
    assert pick_profile(PROFILES, 2, 200000) == (1, 4, 200000)  # below its minimum: padded up to 4 rows
    assert pick_profile(PROFILES, 10, 100) == (0, 10, 1600)  # narrower than every minimum: padded to 1600
    # Both hold 8 x 100000 unpadded: the narrower wins; 3 rows: the one that pads nothing.
    assert pick_profile(PROFILES, 8, 100000) == (0, 8, 100000)
    assert pick_profile([PROFILES[1], PROFILES[0]], 8, 100000) == (1, 8, 100000)
    assert pick_profile(PROFILES, 3, 100000) == (0, 3, 100000)
    assert pick_profile([(1, 64, 1600, 640000), (1, 16, 1600, 640000)], 8, 1600) == (1, 8, 1600)  # fewer rows
    with pytest.raises(Exception, match="no TensorRT optimization profile holds a batch of 17 x 400000"):
        pick_profile(PROFILES, 17, 400000)
    assert [rows_for(PROFILES, w) for w in (1000, 160000, 160001, 640000, 640001)] == [64, 64, 16, 16, 0]


def test_length_batches_respect_rows_per_width():
    lengths = [500000, 100, 200000, 150000, 90000, 100, 600000]
    batches = length_batches(lengths, 3, lambda w: rows_for(PROFILES, w) // 8)  # 8 rows short, 2 long
    assert batches == [[6, 0], [2, 3], [4, 1, 5]]  # 200000 samples is long: 2 rows
    assert length_batches([5, 9, 1, 9, 3], 2) == [[1, 3], [0, 4], [2]]
    with pytest.raises(ValueError, match="no batch holds an utterance of 700000 samples"):
        length_batches([700000], 4, lambda w: rows_for(PROFILES, w))


class PaddedTorchEncoder(TorchEncoder):
    """The torch encoder forced through TensorRT's padding: rows up to a profile minimum, width up to its."""

    def __init__(self, perception, profiles):
        super().__init__(perception, max_batch=max(p[1] for p in profiles))
        self.profiles, self.shapes = profiles, []

    def _rows_for(self, width):
        return min(self.max_batch, rows_for(self.profiles, width))

    def _padded_shape(self, rows, width):
        _, r, w = pick_profile(self.profiles, rows, width)
        self.shapes.append((rows, r, w))
        return r, w


def test_padding_rows_up_to_a_profile_minimum_changes_nothing(model):
    clips = [TINY.audio(s).numpy() for s in TINY.stems]
    waves = [clips[0][:250], clips[1], clips[2][:3000], clips[4]]  # 1 frame, 1.2 s, 0.19 s, 5.9 s
    # Up to 2.5 s: 4-8 rows; up to 6 s: exactly 3 rows. So no profile takes one or two rows.
    profiles = [(4, 8, 8000, 40000), (3, 3, 8000, 96000)]
    padded = PaddedTorchEncoder(model.perception, profiles)
    got = padded.encode(waves)
    want = [TorchEncoder(model.perception, max_batch=1).encode([w])[0] for w in waves]  # each clip alone
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5
    # (rows, padded rows, padded width): the 5.9 s clip leads 3 rows; the 1-frame clip is left alone, padded
    # up to 3 rows (fewer padded samples than the first profile's 4) and 8000 samples.
    assert padded.shapes == [(3, 3, len(clips[4])), (1, 3, 8000)]


# ---- the shared encoder batching ---------------------------------------------------------------------------

def test_host_lengths_match_the_goldens_and_the_model(model):
    for stem in TINY.stems:
        n = len(TINY.audio(stem))
        assert output_frames(model.cfg.frontend, model.cfg.encoder, [n]) == TINY.tensors[f"single.{stem}.proj_lens"].tolist()
    lens = torch.tensor([160, 161, 319, 320, 1281, 16000, 47999])
    x = torch.randn(len(lens), int(lens.max())) * 0.1
    with torch.no_grad():
        *_, emb_lens, _ = model.perception(x, lens)
    assert output_frames(model.cfg.frontend, model.cfg.encoder, lens.tolist()) == emb_lens.tolist()


class LyingEncoder(TorchEncoder):
    def _run(self, audio, lengths):
        emb, emb_lens = super()._run(audio, lengths)
        return emb, emb_lens + 1


def test_a_backend_disagreeing_with_the_length_formula_is_caught(model):
    with pytest.raises(RuntimeError, match="differ from the frontend/subsampling formula"):
        LyingEncoder(model.perception).encode([TINY.audio("a1_yes").numpy()])


def test_batches_of_64_and_the_llm_dtype(files, model):
    rng = np.random.default_rng(1)
    clips = [TINY.audio(s).numpy() for s in TINY.stems]
    # 70 clips of mixed lengths (one hop to 4 s): one batch of 64 and one of 6.
    waves = [np.resize(clips[i % 5], int(n)) for i, n in enumerate(rng.integers(100, 64000, 70))]
    enc = make_encoder("torch", model, files, None)
    assert enc.max_batch == 64
    got = enc.encode(waves)
    for i in (0, 17, 63, 64, 69):
        want = TorchEncoder(model.perception, max_batch=1).encode([waves[i]])[0]
        assert got[i].shape == want.shape and rel_err(got[i], want) < 1e-5
    bf16 = build_model(files, dtype=torch.bfloat16)[0]
    out = make_encoder("torch", bf16, files, None).encode(waves[:3])
    assert {t.dtype for t in out} == {torch.bfloat16}


# ---- frontend --------------------------------------------------------------------------------------------

def test_per_feature_std_is_nan_free_and_equals_nemos_rule():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 9)
    lengths = torch.tensor([1, 2, 5, 9])
    got = normalize_per_feature(x, lengths, 1e-5)
    # NeMo's rule, written out: unbiased std over valid frames, its NaN (one frame) replaced by 0.
    want = torch.empty_like(x)
    for b, n in enumerate(lengths.tolist()):
        v = x[b, :, :n]
        std = v.std(dim=1, unbiased=True)
        std = torch.where(std.isnan(), torch.zeros_like(std), std) + 1e-5
        want[b] = (x[b] - v.mean(dim=1, keepdim=True)) / std[:, None]
    assert not got.isnan().any() and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_trimmed_dft_kernel_matches_the_stft_frontend_on_one_frame_clips(model):
    fe = model.perception.preprocessor
    conv = ConvMelFrontend(fe)
    cfg = fe.cfg
    assert conv.basis.shape == (2 * cfg.n_freqs, 1, cfg.win_length)  # only the window's 400 of 512 taps
    # The full 512-tap windowed DFT, built independently: zero outside the window, the trimmed kernel inside.
    n, k = torch.arange(cfg.n_fft, dtype=torch.float64), torch.arange(cfg.n_freqs, dtype=torch.float64)
    left = (cfg.n_fft - cfg.win_length) // 2
    w = torch.zeros(cfg.n_fft, dtype=torch.float64)
    w[left : left + cfg.win_length] = fe.window.double()
    full = torch.cat((torch.cos(2 * torch.pi * k[:, None] * n / cfg.n_fft) * w,
                      -torch.sin(2 * torch.pi * k[:, None] * n / cfg.n_fft) * w))  # [2 * n_freqs, n_fft]
    assert full[:, :left].abs().max() == 0 and full[:, left + cfg.win_length :].abs().max() == 0
    assert torch.allclose(dft_basis(cfg, fe.window)[:, 0].double(), full[:, left : left + cfg.win_length], atol=1e-6)
    clips = [TINY.audio("a3_fox")[:n] for n in (160, 200, 319, 320, 1600, 16000)]  # 1-frame clips first
    x, lens = pad_batch(clips)
    with torch.no_grad():
        got, got_lens = conv(x, lens)
        want, want_lens = fe(x, lens)
    assert got_lens.tolist() == want_lens.tolist() and got_lens[:3].tolist() == [1, 1, 1]
    assert not got.isnan().any() and rel_err(got, want) < 5e-5


# ---- ONNX parser dtype check, TF32, versions -----------------------------------------------------------

def test_check_graph_flags_an_operator_on_a_type_the_parser_lacks(tmp_path):
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Sqrt", ["x"], ["y"], name="sqrt_int"), h.make_node("Cast", ["y"], ["z"], to=10, name="cast"),
         h.make_node("Relu", ["z"], ["w"], name="relu")], "typed",
        [h.make_tensor_value_info("x", onnx.TensorProto.INT64, [2])],
        [h.make_tensor_value_info("w", onnx.TensorProto.FLOAT16, [2])])
    path = tmp_path / "typed.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
    problems = check_graph(path)
    assert problems == ["sqrt_int: Sqrt on INT64 (x) is not supported by the TensorRT 10.15 parser"]


def test_tf32_and_fp32_plan_choices():
    assert [tf32_cleared("frontend", p) for p in ("fp32", "fp16", "bf16")] == [True, True, True]
    assert [tf32_cleared("encoder", p) for p in ("fp32", "fp16", "bf16")] == [True, False, False]
    assert "--precision bf16" in fp32_plan_warning("fp32", "9.0")
    assert fp32_plan_warning("bf16", "9.0") is None and fp32_plan_warning("fp32", "7.5") is None


def test_tensorrt_version_gate():
    for bad in ("10.0.1.6", "10.1.0", "9.3.0"):
        with pytest.raises(RuntimeError, match="use 10.14 or later"):
            check_tensorrt_version(bad)
    assert "untested" in check_tensorrt_version("10.8.0")
    assert check_tensorrt_version("10.14.1.48") is None and check_tensorrt_version("11.2.0") is None


def test_tensorrt_llm_version_gate_points_to_the_torch_decoder():
    for good in ("1.0.0", "1.1.0", "1.2.0rc6", "1.2.1"):
        assert trtllm_version_problem(good) is None
    for bad, why in (("0.21.0", "predates Qwen3"), ("1.3.0rc15", "removed in 1.3"), ("2.0.0", "removed in 1.3"),
                     (None, "not installed")):
        problem = trtllm_version_problem(bad)
        assert why in problem and "torch decoder" in problem
    with pytest.raises(DecoderBuildError, match="torch decoder"):
        require_trtllm("1.3.0")


def test_executor_finish_reasons():
    assert finish_verdict("END_ID") == ("stop", None)
    assert finish_verdict("STOP_WORDS")[0] is None and "STOP_WORDS" in finish_verdict("STOP_WORDS")[1]
    assert finish_verdict("LENGTH") == ("length", None)
    for reason in ("TIMED_OUT", "CANCELLED", "NOT_FINISHED"):
        verdict, error = finish_verdict(reason)
        assert verdict is None and reason in error
    t = torch.ones(2, 3)
    assert stream_ordered(t) is t  # on the host there is nothing to wait for


# ---- decoder build metadata and the Triton configs ---------------------------------------------------------

@pytest.fixture(scope="module")
def build(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder")
    export_decoder(files, out, "bfloat16", max_batch_size=6, max_audio_seconds=8.0, max_new_tokens=32,
                   skip_engine=True)
    return out


def test_decoder_meta_states_the_qk_norm_eps(build, model):
    diff = read_metadata(build)["known_differences"]["qk_norm_eps"]
    assert diff["engine"] == 1e-5 and diff["model"] == model.cfg.llm.rms_norm_eps == 1e-6


def _engine_kwargs():
    return {"model": str(TINY.root / "model"), "llm": str(TINY.root / "llm"), "device": "cpu", "dtype": None,
            "encoder": "torch", "artifacts": None, "cuda_graphs": True, "max_new_tokens": 32}


def test_triton_configs_take_dtype_batch_and_kv_cache_from_the_build(build, files, tmp_path):
    from engine.backends.decoder_torch import PagedKV
    from runtime.triton.repository import kv_cache_plan, write_repository

    write_repository(tmp_path, _engine_kwargs(), engine_dir=build)
    meta = read_metadata(build)
    trt = (tmp_path / "tensorrt_llm" / "config.pbtxt").read_text()
    enc = (tmp_path / "multimodal_encoders" / "config.pbtxt").read_text()
    assert '{ name: "prompt_embedding_table" data_type: TYPE_BF16' in trt
    assert '{ name: "OUT_PROMPT_EMBEDDING_TABLE" data_type: TYPE_BF16' in enc
    assert "max_batch_size: 6\n" in trt and "max_batch_size: 6\n" in enc
    assert 'key: "cuda_graph_cache_size" value: { string_value: "6" }' in trt
    assert '\\"dtype\\": \\"bfloat16\\"' in enc  # the encoder emits the engine's dtype
    # KV cache: every request of a full batch at max_seq_len, at the torch decoder's own bytes per token.
    plan = kv_cache_plan(meta)
    bf16 = build_model(files, dtype=torch.bfloat16)[0]
    assert plan["bytes_per_token"] == PagedKV.bytes_per_token(bf16)
    assert plan["max_tokens"] == 6 * meta["sizes"]["max_seq_len"]
    assert f'key: "max_tokens_in_paged_kv_cache" value: {{ string_value: "{plan["max_tokens"]}" }}' in trt
    assert "decoupled: true" in trt and "gRPC stream" in trt
    meta["dtype"] = "float16"
    (build / "decoder_meta.json").write_text(json.dumps(meta))
    try:
        write_repository(tmp_path, _engine_kwargs(), engine_dir=build)
        assert "data_type: TYPE_FP16" in (tmp_path / "tensorrt_llm" / "config.pbtxt").read_text()
    finally:
        meta["dtype"] = "bfloat16"
        (build / "decoder_meta.json").write_text(json.dumps(meta))
    with pytest.raises(DecoderBuildError, match="missing"):
        write_repository(tmp_path, _engine_kwargs(), engine_dir=tmp_path / "nothing")


def test_ensemble_encoder_loads_the_perception_alone_and_emits_the_engine_dtype(build, model):
    from runtime.triton.ensemble import open_audio_encoder

    info = EngineInfo.from_meta(read_metadata(build))
    # The model folder alone: no base-LLM config is read.
    encode = open_audio_encoder("torch", str(TINY.root / "model"), None, "cpu", "bfloat16")
    wave = TINY.audio("a2_morning").numpy()
    (table, frames), = encode([wave])
    assert table.dtype == info.dtype == torch.bfloat16 and table.device.type == "cpu"
    assert frames == table.shape[0] == TINY.tensors["single.a2_morning.proj_lens"].item()
    want = TINY.tensors["single.a2_morning.proj"][0, :frames]  # NeMo's rows past the length are padding
    assert rel_err(table.float(), want) < 2e-2  # bf16 encoder against NeMo's fp32 embeddings


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_says_so(files, model, tmp_path):
    (tmp_path / "tensorrt_metadata.json").write_text("{}")
    with pytest.raises(RuntimeError, match="TensorRT is not usable here"):
        make_encoder("tensorrt", model, files, tmp_path)


def test_artifacts_with_other_frontend_settings_are_refused(model, tmp_path):
    from engine.export.artifacts import ArtifactError, check_model_config

    fe, enc = model.cfg.frontend, model.cfg.encoder
    meta = {"model": {"sample_rate": fe.sample_rate, "hop_length": fe.hop_length, "n_mels": fe.n_mels,
                      "subsampling_factor": enc.subsampling_factor}}
    check_model_config(meta, fe, enc, tmp_path / "onnx_metadata.json")
    meta["model"]["subsampling_factor"] *= 2  # the host-side lengths would be wrong
    with pytest.raises(ArtifactError, match="re-export the encoder"):
        check_model_config(meta, fe, enc, tmp_path / "onnx_metadata.json")
