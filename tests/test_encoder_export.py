"""Encoder export: the exported graphs, run by ONNX Runtime, reproduce NeMo's goldens and the torch reference
on batches and lengths other than the export example; they only use operators the TensorRT ONNX parser
supports; their metadata is written, read and enforced; the CLI transcribes through them.

Tolerances (max |a - b| / max |b|, as in test_parity.py); in brackets the worst case measured on this fixture
over the padded batch, each clip alone and the long + short pair:
- frontend.onnx vs NeMo's mel: 5e-5, mean 2e-6 (1.7e-5: the log-amplified rounding of near-silent bins, as for
  the torch frontend, 1.0e-5 from NeMo; here the DFT is a 512-term convolution instead of an FFT);
- fp32 encoder.onnx vs NeMo / torch: 1e-4 (5.1e-7);
- fp16 encoder.onnx in ONNX Runtime (CPU): 2e-3 (3.6e-4; the torch model cast to fp16 is 1.2e-3 away);
- bf16 encoder.onnx: 2e-2 (9.4e-3; the torch model cast to bf16 is 7.0e-3 away). onnxruntime's CPU provider
  has no bfloat16 kernels (Mul, Conv, ...), so this graph runs in onnx's reference evaluator instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import FIXTURES, Golden, pad_batch, rel_err

ort = pytest.importorskip("onnxruntime")

from engine.backends.encoder import length_batches, make_encoder  # noqa: E402
from engine.backends.encoder_onnx import session_options  # noqa: E402
from engine.backends.encoder_torch import TorchEncoder  # noqa: E402
from engine.checkpoint import build_model, file_sha256, resolve  # noqa: E402
from engine.encoder import relative_positions, subsampled_lengths  # noqa: E402
from engine.export.artifacts import ONNX_METADATA, ArtifactError, check_tensorrt, read_metadata  # noqa: E402
from engine.export.onnx import export_onnx, load_perception  # noqa: E402
from engine.export.tensorrt import check_graph  # noqa: E402
from engine.frontend import ConvMelFrontend, feature_lengths  # noqa: E402
from runtime.cli import main as cli_main  # noqa: E402

TINY = Golden(FIXTURES / "tiny-canary-qwen")
ROOT = FIXTURES.parent.parent
MAX_DURATION = 8.0  # above the longest fixture clip (5.9 s), small enough to keep the exports quick
MEL_TOL, MEL_MEAN_TOL = 5e-5, 2e-6
TOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 2e-2}
MODEL_ARGS = ["--model", str(TINY.root / "model"), "--llm", str(TINY.root / "llm"), "--device", "cpu"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "build" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files():
    return resolve(TINY.root / "model", TINY.root / "llm")


@pytest.fixture(scope="module")
def model(files):
    return build_model(files)[0]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    """Exported the way a user does it: through build/export_encoder.py."""
    out = tmp_path_factory.mktemp("encoder-fp32")
    # The model folder alone (no --llm): its config names a base LLM that is not on this machine, and offline
    # the hub cannot be asked; the projection's width comes from the weights.
    args = ["--model", str(TINY.root / "model"), "--output", str(out), "--max-duration", str(MAX_DURATION)]
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert load_script("export_encoder").main(args) == 0
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return out


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory, files):
    """External data forced: the layout a real (> 1 GiB) model gets."""
    out = tmp_path_factory.mktemp("encoder-fp16")
    export_onnx(load_perception(files), files.weights, out, "fp16", MAX_DURATION, external_data=True)
    return out


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, files):
    out = tmp_path_factory.mktemp("encoder-bf16")
    export_onnx(load_perception(files), files.weights, out, "bf16", MAX_DURATION)
    return out


def session(path):
    return ort.InferenceSession(str(path), sess_options=session_options(threads=1), providers=["CPUExecutionProvider"])


def run_graphs(d, stems, encoder_run=None):
    """Padded batch of fixture clips through frontend.onnx then encoder.onnx (in onnxruntime unless
    ``encoder_run`` is given) -> (mel, mel_lens, emb, emb_lens)."""
    x, lens = pad_batch([TINY.audio(s) for s in stems])
    mel, mel_lens = session(d / "frontend.onnx").run(None, {"audio": x.numpy(), "audio_lengths": lens.numpy()})
    feeds = {"audio_features": mel, "feature_lengths": mel_lens}
    emb, emb_lens = (encoder_run or session(d / "encoder.onnx").run)(None, feeds)
    emb = np.asarray(emb).astype(np.float32)  # the graph's precision (bf16 arrives as an ml_dtypes array)
    return tuple(torch.from_numpy(np.asarray(t)) for t in (mel, mel_lens, emb, emb_lens))


def valid(t, lens):
    """Zero frames past each length of a [B, T, H] tensor so padding is not compared."""
    return t * (torch.arange(t.shape[1])[None, :, None] < lens[:, None, None])


def check_against_goldens(d, precision, encoder_run=None):
    g = TINY.tensors
    # The padded batch of five, each clip alone (batch of one), and an unseen pair: longest + shortest.
    cases = [("batch", TINY.stems, None)] + [(f"single.{s}", [s], None) for s in TINY.stems]
    cases.append(("pair", ["a5_numbers", "a1_yes"], ["single.a5_numbers", "single.a1_yes"]))
    for name, stems, singles in cases:
        mel, mel_lens, emb, emb_lens = run_graphs(d, stems, encoder_run)
        refs = singles or [name]
        for row, ref in enumerate(refs):
            rows = slice(None) if singles is None else slice(row, row + 1)
            want_lens = g[f"{ref}.proj_lens"]
            assert emb_lens[rows].tolist() == want_lens.tolist()
            assert mel_lens[rows].tolist() == g[f"{ref}.mel_lens"].tolist()
            t_enc, t_mel = g[f"{ref}.proj"].shape[1], g[f"{ref}.mel"].shape[2]
            if precision == "fp32":
                want_mel = g[f"{ref}.mel"]
                got_mel = mel[rows, :, :t_mel]
                assert rel_err(got_mel, want_mel) < MEL_TOL, (name, ref)
                assert (got_mel - want_mel).abs().mean().item() < MEL_MEAN_TOL, (name, ref)
            err = rel_err(valid(emb[rows, :t_enc], want_lens), valid(g[f"{ref}.proj"], want_lens))
            assert err < TOL[precision], (precision, name, ref, err)


def test_conv_frontend_matches_stft_frontend_and_nemo(model):
    fe = model.perception.preprocessor
    conv = ConvMelFrontend(fe)
    for name, stems in [("batch", TINY.stems)] + [(f"single.{s}", [s]) for s in TINY.stems]:
        x, lens = pad_batch([TINY.audio(s) for s in stems])
        with torch.no_grad():
            got, got_lens = conv(x, lens)
            ref, _ = fe(x, lens)
        want = TINY.tensors[f"{name}.mel"]
        assert got_lens.tolist() == TINY.tensors[f"{name}.mel_lens"].tolist()
        assert rel_err(got, want) < MEL_TOL and (got - want).abs().mean().item() < MEL_MEAN_TOL
        assert rel_err(got, ref) < MEL_TOL


def test_sliced_position_table_is_bit_identical(model):
    d = model.cfg.encoder.d_model
    table = relative_positions(80, d, torch.device("cpu"))
    for t in (1, 2, 7, 79, 80):
        assert torch.equal(table[:, 80 - t : 80 + t - 1], relative_positions(t, d, torch.device("cpu")))
    x, lens = pad_batch([TINY.audio(s) for s in ("a4_stella", "a2_morning")])
    with torch.no_grad():
        mel, mel_lens, enc, enc_lens, _ = model.perception(x, lens)
        enc_table, lens_table = model.perception.encoder(mel, mel_lens, table)
    assert torch.equal(enc_table, enc) and torch.equal(lens_table, enc_lens)


def test_frontend_and_fp32_encoder_onnx_match_nemo_goldens(fp32_dir):
    check_against_goldens(fp32_dir, "fp32")


def test_frontend_onnx_lengths_at_hop_boundaries(fp32_dir, model):
    # The exporter computes L // hop in float32 (Div + Floor): exact here, checked where rounding would show.
    n = int(MAX_DURATION * 16000)
    lens = torch.tensor([n, n - 1, n - 159, n - 160, 160, 161, 319, 1281])
    audio = np.zeros((len(lens), n), np.float32)
    _, got = session(fp32_dir / "frontend.onnx").run(None, {"audio": audio, "audio_lengths": lens.numpy()})
    assert got.tolist() == feature_lengths(model.cfg.frontend, lens).tolist()


def test_fp16_encoder_onnx_matches_nemo_goldens(fp16_dir):
    meta = read_metadata(fp16_dir / ONNX_METADATA)
    (data,) = meta["files"]["encoder"]["external_data"]  # the weights live beside the graph, hashed
    assert data["sha256"] == file_sha256(fp16_dir / data["file"])
    assert (fp16_dir / "encoder.onnx").stat().st_size < (fp16_dir / data["file"]).stat().st_size
    check_against_goldens(fp16_dir, "fp16")


def test_bf16_encoder_onnx_matches_nemo_goldens(bf16_dir):
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(bf16_dir / "encoder.onnx"))
    g = TINY.tensors
    _, _, emb, emb_lens = run_graphs(bf16_dir, ["a3_fox", "a1_yes"], evaluator.run)
    for row, stem in enumerate(["a3_fox", "a1_yes"]):
        want, want_lens = g[f"single.{stem}.proj"], g[f"single.{stem}.proj_lens"]
        assert emb_lens[row : row + 1].tolist() == want_lens.tolist()
        assert rel_err(valid(emb[row : row + 1, : want.shape[1]], want_lens), valid(want, want_lens)) < TOL["bf16"]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_graphs_keep_fp32_islands(precision, request):
    d = request.getfixturevalue(f"{precision}_dir")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(d / "encoder.onnx")), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    low = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.BFLOAT16
    f32 = onnx.TensorProto.FLOAT
    islands = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert islands and all(types[n.input[0]] == f32 and types[n.output[0]] == f32 for n in islands)
    matmuls = [types[n.output[0]] for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls.count(low) > 0 and matmuls.count(f32) > 0  # linears low, attention scores fp32
    assert {v.name: types[v.name] for v in list(model.graph.input) + list(model.graph.output)} == {
        "audio_features": f32, "feature_lengths": onnx.TensorProto.INT64,
        "audio_embeddings": low, "embedding_lengths": onnx.TensorProto.INT64}  # embeddings in the LLM's dtype
    frontend = onnx.shape_inference.infer_shapes(onnx.load(str(d / "frontend.onnx")), strict_mode=True)
    values = list(frontend.graph.value_info) + list(frontend.graph.output)
    assert all(v.type.tensor_type.elem_type != low for v in values)
    assert all(t.data_type != low for t in frontend.graph.initializer)


def test_graphs_only_use_tensorrt_parser_operators(fp32_dir, fp16_dir, bf16_dir, tmp_path):
    for d in (fp32_dir, fp16_dir, bf16_dir):
        for name in ("frontend.onnx", "encoder.onnx"):
            assert check_graph(d / name) == [], (d, name)
    # The check can fail: a graph with ONNX's DFT (not in the parser's list) and a computed Squeeze axis.
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("DFT", ["x"], ["y"], name="dft"), h.make_node("Shape", ["y"], ["axes"], name="shape"),
         h.make_node("Squeeze", ["y", "axes"], ["z"], name="squeeze")], "bad",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 1])],
        [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)])
    bad = tmp_path / "bad.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(bad))
    problems = check_graph(bad)
    assert any("DFT is not supported" in p for p in problems)
    assert any("Squeeze input 1 (axes) must be a constant" in p for p in problems)


def test_metadata_round_trip(fp32_dir, fp16_dir, bf16_dir, files, model):
    for d, precision in ((fp32_dir, "fp32"), (fp16_dir, "fp16"), (bf16_dir, "bf16")):
        meta = read_metadata(d / ONNX_METADATA)
        assert meta["precision"] == precision
        assert meta["checkpoint"] == {"file": "model.safetensors", "sha256": file_sha256(files.weights)}
        for key in ("frontend", "encoder"):
            entry = meta["files"][key]
            assert entry["sha256"] == file_sha256(d / entry["file"])
            assert ("external_data" in entry) == (key == "encoder" and precision == "fp16")
            graph = onnx.load(str(d / entry["file"]), load_external_data=False)
            assert [o.version for o in graph.opset_import if o.domain == ""] == [meta["opset"][key]]
        enc = meta["files"]["encoder"]
        assert enc["inputs"]["audio_features"] == {"dtype": "float32", "shape": ["batch", 128, "mel_frames"]}
        assert enc["outputs"]["audio_embeddings"]["shape"][2] == model.cfg.llm.hidden_size
        assert enc["outputs"]["audio_embeddings"]["dtype"] == {"fp32": "float32", "fp16": "float16",
                                                               "bf16": "bfloat16"}[precision]
        assert enc["outputs"]["embedding_lengths"]["dtype"] == "int64"
        assert meta["files"]["frontend"]["inputs"]["audio"]["shape"] == ["batch", "samples"]
        s = meta["shapes"]
        assert s["max_samples"] == MAX_DURATION * 16000 and s["max_mel_frames"] == s["max_samples"] // 160 + 1
        assert s["max_enc_frames"] == int(subsampled_lengths(model.cfg.encoder, torch.tensor(s["max_mel_frames"])))
        assert {"torch", "onnx", "onnxscript"} <= set(meta["tools"])


def test_mismatched_artifacts_are_refused(fp32_dir, model, files, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fp32_dir, other)
    meta = json.loads((other / ONNX_METADATA).read_text())
    meta["checkpoint"]["sha256"] = "0" * 64
    (other / ONNX_METADATA).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="was built from a checkpoint with sha256 0000.*re-export"):
        make_encoder("onnx", model, files, other)
    (other / ONNX_METADATA).unlink()
    with pytest.raises(ArtifactError, match="metadata file not found"):
        make_encoder("onnx", model, files, other)
    # Plans carry the TensorRT version and GPU they were built for (pure check: no TensorRT needed).
    built = {"tensorrt": {"version": "10.14.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}
    check_tensorrt(built, other, "10.14.1", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(ArtifactError, match=r"TensorRT 10.14.1 built it, this is TensorRT 11.4.0.*A100.*rebuild"):
        check_tensorrt(built, other, "11.4.0", "NVIDIA A100-SXM4-80GB", "8.0")


def test_onnx_backend_matches_torch_on_mixed_batches(fp32_dir, model, files):
    rng = np.random.default_rng(0)
    clips = [TINY.audio(s).numpy() for s in TINY.stems]
    long = np.concatenate(clips[4:] + clips[3:4])[: int(7.9 * 16000)]  # 7.9 s, near the export maximum
    # Tiny (below one hop, and below the traced minimum width), short, the fixture clips and a long one.
    waves = [rng.standard_normal(100).astype(np.float32) * 0.1, clips[0][:1000], *clips, long]
    onnx_enc = make_encoder("onnx", model, files, fp32_dir, max_batch=3, threads=1)
    torch_enc = TorchEncoder(model.perception, max_batch=3)
    assert onnx_enc.name == "onnx" and onnx_enc.min_width > 1000
    for got, want in zip(onnx_enc.encode(waves), torch_enc.encode(waves), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) < TOL["fp32"]
    with pytest.raises(ValueError, match="at most 8.00 s.*--max-duration"):
        onnx_enc.encode([np.zeros(int(8.5 * 16000), np.float32)])
    # The engine's batches: up to 64 clips (the default), lengths from one hop to 2 s.
    many = [np.resize(clips[i % 5], int(n)) for i, n in enumerate(rng.integers(100, 32000, 66))]
    onnx64 = make_encoder("onnx", model, files, fp32_dir, threads=1)
    assert onnx64.max_batch == 64
    # Against the torch encoder on the same batches: fp32 padding invariance is not bit-exact, and a 1-frame
    # clip's max |value| is small, so a different batch composition alone moves it by ~1e-4 relative.
    torch64 = TorchEncoder(model.perception, max_batch=64)
    for i, (got, want) in enumerate(zip(onnx64.encode(many), torch64.encode(many), strict=True)):
        assert got.shape == want.shape and rel_err(got, want) < TOL["fp32"], i
    assert length_batches([5, 9, 1, 9, 3], 2) == [[1, 3], [0, 4], [2]]


def test_make_encoder_picks_and_refuses(fp32_dir, model, files):
    assert make_encoder("auto", model, files, fp32_dir).name == "onnx"  # no plans, onnxruntime present
    assert make_encoder("auto", model, files, None).name == "torch"
    assert make_encoder(None, model, files, None).name == "torch"
    with pytest.raises(ValueError, match="needs an artifacts folder"):
        make_encoder("onnx", model, files, None)
    with pytest.raises(ValueError, match="unknown encoder backend"):
        make_encoder("openvino", model, files, fp32_dir)


def test_cli_transcribe_through_onnx_gives_the_torch_transcripts(fp32_dir, capsys):
    wavs = [str(TINY.audio_path(s)) for s in TINY.stems]
    code = cli_main(["transcribe", *wavs, *MODEL_ARGS, "--encoder", "onnx", "--artifacts", str(fp32_dir),
                     "--max-new-tokens", str(TINY.max_new_tokens), "--output-format", "jsonl", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["audio"] for r in rows] == wavs
    for stem, row in zip(TINY.stems, rows):
        ref = TINY.meta["per_utterance"][stem]["single"]  # what torch gives too (test_api_cli.py)
        ids = [int(i) for i in ref["gen_ids"]]
        assert row["token_ids"] == (ids[:-1] if ref["eos_produced"] else ids)
        assert row["text"] == ref["text"].strip()


def test_cli_check_encoder(fp32_dir, capsys):
    wavs = [str(TINY.audio_path(s)) for s in TINY.stems]
    args = ["check-encoder", *wavs, *MODEL_ARGS, "--artifacts", str(fp32_dir), "--backend", "onnx",
            "--batch-size", "3"]
    assert cli_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines if line.split("\t")[0] in wavs]
    assert [r[0] for r in rows] == wavs
    for _, frames, max_abs, rel, cos in rows:
        assert int(frames) > 0 and float(max_abs) < 1e-4 and float(rel) < TOL["fp32"] and float(cos) > 0.99999
    assert lines[-1].startswith("# ok")
    assert cli_main(args + ["--min-cosine", "1.5"]) == 1  # no cosine reaches it: the check can fail
    assert "FAILED" in capsys.readouterr().out.splitlines()[-1]


def test_tensorrt_profile_shapes(fp32_dir):
    from engine.export.tensorrt import Profile, parser_ops

    meta = read_metadata(fp32_dir / ONNX_METADATA)
    shapes = Profile((1, 4, 16), (0.01, 2.0, MAX_DURATION)).shapes(meta)
    min_width = meta["shapes"]["min_width"]  # 0.01 s is narrower than the traced minimum: raised to it
    assert shapes["frontend"] == {"audio": [[1, min_width], [4, 32000], [16, 128000]],
                                  "audio_lengths": [[1], [4], [16]]}
    frames = [min_width // 160 + 1, 201, meta["shapes"]["max_mel_frames"]]
    assert shapes["encoder"] == {"audio_features": [[1, 128, frames[0]], [4, 128, 201], [16, 128, frames[2]]],
                                 "feature_lengths": [[1], [4], [16]]}
    with pytest.raises(ValueError, match="exceeds the 8.0 s the ONNX was exported for"):
        Profile((1, 1, 1), (1.0, 1.0, 9.0)).shapes(meta)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        Profile((2, 1, 4), (1.0, 1.0, 2.0)).shapes(meta)
    ops = parser_ops()
    assert ops.version == "10.15" and ops.opsets == (9, 24) and {"Conv", "LayerNormalization"} <= set(ops.ops)
    assert not {"DFT", "MelWeightMatrix"} & set(ops.ops)
    assert ops.ops["STFT"] == {"FLOAT"} and ops.ops["Conv"] == {"FLOAT", "FLOAT16", "BFLOAT16"}


def test_build_engine_script_says_tensorrt_is_missing(fp32_dir, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the missing-TensorRT message is not reachable")
    assert load_script("build_encoder_engine").main(["--artifacts", str(fp32_dir)]) == 2
    assert "TensorRT is not usable here" in capsys.readouterr().err


def tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"tensorrt is not importable ({e})")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT plans need a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_plans_match_torch(precision, request, files, tmp_path):
    tensorrt_or_skip()
    from engine.export.artifacts import PLAN_METADATA
    from engine.export.tensorrt import Profile, build_plans

    d = tmp_path / precision
    shutil.copytree(request.getfixturevalue(f"{precision}_dir"), d)
    meta = build_plans(d, [Profile((1, 2, 4), (0.05, 3.0, MAX_DURATION))], tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0 and meta["precision"] == precision
    model = build_model(files, device="cuda")[0]
    clips = [TINY.audio(s).numpy() for s in TINY.stems]
    waves = [clips[0][:200], *clips, np.concatenate(clips[::-1])[: int(7.9 * 16000)]]
    got = make_encoder("tensorrt", model, files, d).encode(waves)
    want = TorchEncoder(model.perception, max_batch=4).encode(waves)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and rel_err(g.float().cpu(), w.float().cpu()) < TOL[precision]
    assert make_encoder("auto", model, files, d).name == "tensorrt"
    plan_meta = json.loads((d / PLAN_METADATA).read_text())
    plan_meta["tensorrt"]["gpu"] = "some other GPU"
    (d / PLAN_METADATA).write_text(json.dumps(plan_meta))
    with pytest.raises(ArtifactError, match="rebuild the plans"):
        make_encoder("tensorrt", model, files, d)


@pytest.mark.tensorrt
def test_tensorrt_two_profiles_and_a_batch_of_16_near_the_maximum(bf16_dir, files, tmp_path):
    """What the README recommends: bf16, a short-clip profile with big batches and a long-clip one; a batch of
    16 clips near the maximum length, a batch below the long profile's minimum (padded with masked rows), and
    the one-by-one path, all against the torch encoder in bf16 on the same GPU."""
    tensorrt_or_skip()
    from engine.export.tensorrt import Profile, build_plans

    d = tmp_path / "bf16"
    shutil.copytree(bf16_dir, d)
    build_plans(d, [Profile((1, 32, 64), (0.05, 2.0, 3.0)), Profile((4, 8, 16), (3.0, 6.0, MAX_DURATION))],
                tmp_path / "timing.cache")
    model = build_model(files, dtype=torch.bfloat16, device="cuda")[0]
    clips = [TINY.audio(s).numpy() for s in TINY.stems]
    joined = np.concatenate(clips * 3)
    rng = np.random.default_rng(0)
    long = [joined[o : o + int(7.9 * 16000) - 37 * i] for i, o in enumerate(rng.integers(0, 16000, 16))]
    short = [c[: int(n)] for c, n in zip(clips * 8, rng.integers(100, 40000, 40))]
    enc = make_encoder("tensorrt", model, files, d)
    ref = TorchEncoder(model.perception, max_batch=16)
    for waves in (long, long[:2], short, short[:1] + long[:1]):  # 16 long; 2 long (< min 4); 40 short; mixed
        got, want = enc.encode(waves), ref.encode(waves)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == torch.bfloat16
            assert rel_err(g.float().cpu(), w.float().cpu()) < TOL["bf16"]
