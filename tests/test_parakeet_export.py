"""Parakeet-TDT's ONNX graphs (engine/export/tdt_onnx.py) in onnxruntime against torch and NeMo's goldens.

The encoder goes through the shared Canary-Qwen export (frontend.onnx + encoder.onnx, projection = joint.enc);
the prediction and joint networks are small graphs of their own. A greedy TDT loop written here in numpy over
the two decoder graphs must reproduce NeMo's single-utterance tokens, frames and durations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import pad_batch, rel_err
from test_parakeet import NEMO, ROOT, audio, model, utterances

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from engine.export.tdt_onnx import export_parakeet

    out = tmp_path_factory.mktemp("parakeet-onnx")
    net, _ = model()
    meta = export_parakeet(net, NEMO, out, precision="fp32", max_duration=9.0)  # utt04 is 8.1 s
    return out, meta


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_metadata(exported):
    out, meta = exported
    net, _ = model()
    d = json.loads((out / "tdt_metadata.json").read_text())
    assert d["blank_id"] == net.cfg.blank_id and d["durations"] == list(net.cfg.durations)
    assert d["max_symbols"] == net.cfg.max_symbols and d["joint_outputs"] == net.cfg.joint_outputs
    assert meta["model"]["llm_hidden"] == net.cfg.joint_hidden  # the encoder graph ends in joint.enc
    assert d["checkpoint"]["sha256"] == meta["checkpoint"]["sha256"]


def test_encoder_graphs_match_torch_and_decode_as_nemo(exported):
    from engine.tdt import GreedyTDT

    out, _ = exported
    net, _ = model()
    utts = utterances()
    x, lens = pad_batch([audio(u) for u in utts])
    fe, enc = session(out / "frontend.onnx"), session(out / "encoder.onnx")
    feats, feat_lens = fe.run(None, {"audio": x.numpy(), "audio_lengths": lens.numpy()})
    emb, emb_lens = enc.run(None, {"audio_features": feats, "feature_lengths": feat_lens})
    with torch.no_grad():
        _, _, ref, ref_lens = net.encode(x, lens)
        ref = net.joint.enc(ref)
    assert emb_lens.tolist() == ref_lens.tolist() == [u["enc_len"] for u in utts]
    for i, n in enumerate(ref_lens.tolist()):
        assert rel_err(torch.from_numpy(emb[i, :n]), ref[i, :n]) < 1e-4  # the conv-DFT frontend: see onnx.py
    hyps = GreedyTDT(net).decode(torch.from_numpy(emb), torch.from_numpy(emb_lens), projected=True)
    for u, h in zip(utts, hyps):
        assert (h.token_ids, h.timesteps, h.durations) == (
            u["single"]["token_ids"], u["single"]["timestep"], u["single"]["token_duration"]), u["id"]


def test_decoder_graphs_match_torch(exported):
    out, _ = exported
    net, _ = model()
    cfg = net.cfg
    pred, joint = session(out / "prediction.onnx"), session(out / "joint.onnx")
    rng = np.random.default_rng(0)
    for b in (1, 3, 8):
        labels = rng.integers(0, cfg.blank_id + 1, size=b).astype(np.int64)
        labels[0] = cfg.blank_id  # the start symbol: zero embedding
        h = rng.standard_normal((cfg.pred_rnn_layers, b, cfg.pred_hidden)).astype(np.float32)
        c = rng.standard_normal((cfg.pred_rnn_layers, b, cfg.pred_hidden)).astype(np.float32)
        got = pred.run(None, {"labels": labels, "h": h, "c": c})
        with torch.no_grad():
            g, h2, c2 = net.prediction(torch.from_numpy(labels), torch.from_numpy(h), torch.from_numpy(c))
            want = (net.joint.pred(g), h2, c2)
        for a, w in zip(got, want):
            assert rel_err(torch.from_numpy(a), w) < 1e-5
        f = rng.standard_normal((b, cfg.joint_hidden)).astype(np.float32)
        (logits,) = joint.run(None, {"enc_proj": f, "pred_proj": got[0]})
        with torch.no_grad():
            ref = net.joint(torch.from_numpy(f), want[0])
        assert rel_err(torch.from_numpy(logits), ref) < 1e-5
        assert (logits[:, : cfg.blank_id + 1].argmax(-1) == ref[:, : cfg.blank_id + 1].argmax(-1).numpy()).all()


def greedy_numpy(pred, joint, fp: np.ndarray, meta: dict) -> tuple[list[int], list[int], list[int]]:
    """NeMo's single-utterance greedy TDT (tests/fixtures/tdt-tiny/README.md, 3.6) over the two graphs."""
    blank, durations, max_symbols = meta["blank_id"], meta["durations"], meta["max_symbols"]
    zeros = np.zeros((meta["pred_rnn_layers"], 1, meta["pred_hidden"]), np.float32)
    gp, h, c = pred.run(None, {"labels": np.array([blank]), "h": zeros, "c": zeros})
    tokens, frames, durs = [], [], []
    t, last_t, run = 0, -1, 0
    while t < fp.shape[0]:
        (z,) = joint.run(None, {"enc_proj": fp[t : t + 1], "pred_proj": gp})
        k, d = int(z[0, : blank + 1].argmax()), durations[int(z[0, blank + 1 :].argmax())]
        if k == blank:
            t += max(d, 1)
            continue
        tokens.append(k)
        frames.append(t)
        durs.append(d)
        gp, h, c = pred.run(None, {"labels": np.array([k]), "h": h, "c": c})
        run = run + 1 if t == last_t else 1
        last_t = t
        t += d
        if run >= max_symbols and d == 0:
            t += 1
    return tokens, frames, durs


def test_onnx_only_greedy_decoding_matches_nemo(exported):
    out, _ = exported
    meta = json.loads((out / "tdt_metadata.json").read_text())
    pred, joint = session(out / "prediction.onnx"), session(out / "joint.onnx")
    fe, enc = session(out / "frontend.onnx"), session(out / "encoder.onnx")
    for u in utterances():
        x = audio(u).numpy()[None]
        feats, feat_lens = fe.run(None, {"audio": x, "audio_lengths": np.array([x.shape[1]])})
        emb, emb_lens = enc.run(None, {"audio_features": feats, "feature_lengths": feat_lens})
        got = greedy_numpy(pred, joint, emb[0, : int(emb_lens[0])], meta)
        assert got == (u["single"]["token_ids"], u["single"]["timestep"], u["single"]["token_duration"]), u["id"]


def test_engine_with_the_onnx_encoder(exported):
    """ParakeetEngine on the exported encoder (the shared ONNX backend, checkpoint hash checked): NeMo's results."""
    from runtime.parakeet import ParakeetEngine

    out, _ = exported
    with ParakeetEngine.from_pretrained(NEMO, device="cpu", encoder="onnx", artifacts=out) as e:
        assert e.encoder is not None and e.encoder.name == "onnx"
        results = [r for _, r in e.map([str(ROOT / u["file"]) for u in utterances()])]
    for r, u in zip(results, utterances()):
        ts = u["transcribe_single_timestamps"]
        assert (r.text, r.token_ids, r.extra["durations"]) == (ts["text"], ts["token_ids"], ts["token_duration"])
        assert [{k: w[k] for k in ("word", "start", "end")} for w in r.extra["words"]] == [
            {k: w[k] for k in ("word", "start", "end")} for w in ts["word"]]


def test_check_encoder_and_the_build_script(exported, tmp_path, capsys):
    """``canary-trt check-encoder`` and ``build/export_encoder.py`` take a Parakeet --model too."""
    import subprocess
    import sys

    from runtime.cli import main

    out, _ = exported
    wavs = [str(ROOT / u["file"]) for u in utterances()]
    rc = main(["check-encoder", *wavs, "--model", str(NEMO), "--artifacts", str(out), "--backend", "onnx",
               "--device", "cpu", "--batch-size", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "# ok: worst cosine" in text and text.count("\n") == len(wavs) + 3
    script = ROOT.parents[2] / "build" / "export_encoder.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(NEMO), "--output", str(tmp_path / "a"),
                           "--max-duration", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"frontend.onnx", "encoder.onnx", "prediction.onnx", "joint.onnx", "tdt_metadata.json"} <= names
