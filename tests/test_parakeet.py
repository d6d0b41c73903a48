"""Parakeet-TDT against NeMo 3.0's own outputs (tests/fixtures/tdt-tiny, see its README), and the loader's errors.

Single utterances match NeMo's single-utterance goldens exactly (tokens, frames, durations, texts, timestamps).
Batches must give every row its single-utterance result: NeMo's own batched decoder records wrong durations for
some rows (fixture README, "Batch vs single"), so the batch goldens are used for mel, encoder output, tokens and
frames, and the single goldens for durations.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from functools import lru_cache
from pathlib import Path

import pytest
import soundfile as sf
import torch

from conftest import FIXTURES, pad_batch, rel_err
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.parakeet import (CANARY_QWEN, PARAKEET_TDT, NemoError, build_from_state, checkpoint_names,
                             config_from_yaml, count_parameters, detect_family, load_parakeet)
from engine.tdt import GreedyTDT, finalize

ROOT = FIXTURES / "tdt-tiny"
NEMO = ROOT / "model" / "parakeet.nemo"
V2_CONFIG = FIXTURES / "parakeet-v2-config" / "model_config.yaml"
TOL = 1e-5
MEL_TOL, MEL_MEAN_TOL = 5e-5, 2e-6  # as tests/test_parity.py: log() of near-silent bins amplifies FFT rounding
WORD_KEYS = ("word", "start_offset", "end_offset", "start", "end")


@lru_cache(maxsize=1)
def golden() -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((ROOT / "golden.json").read_text()), load_file(str(ROOT / "golden.safetensors"))


@lru_cache(maxsize=1)
def model():
    return load_parakeet(NEMO)


def utterances() -> list[dict]:
    return golden()[0]["utterances"]


def audio(u: dict) -> torch.Tensor:
    x, sr = sf.read(str(ROOT / u["file"]), dtype="float32")
    assert sr == 16000
    return torch.from_numpy(x)


def encode(waves: list[torch.Tensor]):
    net, _ = model()
    x, lens = pad_batch(waves)
    with torch.no_grad():
        return net.encode(x, lens)


def hyp_fields(h) -> dict:
    return {"token_ids": h.token_ids, "timestep": h.timesteps, "token_duration": h.durations,
            "token_duration_index": h.duration_indices}


UTTS = [u["id"] for u in json.loads((ROOT / "golden.json").read_text())["utterances"]]


@pytest.mark.parametrize("uid", UTTS)
def test_single_utterance_matches_nemo(uid):
    meta, g = golden()
    u = next(x for x in meta["utterances"] if x["id"] == uid)
    net, tok = model()
    mel, mel_lens, enc, enc_lens = encode([audio(u)])
    ref_mel = g[f"single.{uid}.mel"]
    assert mel.shape == ref_mel.shape and mel_lens.tolist() == g[f"single.{uid}.mel_len"].tolist()
    assert rel_err(mel, ref_mel) < MEL_TOL and (mel - ref_mel).abs().mean().item() < MEL_MEAN_TOL
    ref_enc = g[f"single.{uid}.enc"].transpose(1, 2)  # NeMo: [B, D, T]
    assert enc.shape == ref_enc.shape and enc_lens.tolist() == g[f"single.{uid}.enc_len"].tolist() == [u["enc_len"]]
    assert rel_err(enc, ref_enc) < TOL
    hyp = GreedyTDT(net).decode(enc, enc_lens)[0]
    for key, value in hyp_fields(hyp).items():
        assert value == g[f"single.{uid}.{key}"].tolist() == u["single"][key], key
    result = finalize(hyp, tok, net.cfg)
    ts = u["transcribe_single_timestamps"]
    assert result.text == u["single"]["text"] == ts["text"]
    assert [t["piece"] for t in result.tokens] == u["single"]["token_pieces"]
    assert [{"char": [t["text"]], **{k: t[k] for k in ("start_offset", "end_offset", "start", "end")}}
            for t in result.tokens] == ts["char"]
    assert [{k: w[k] for k in WORD_KEYS} for w in result.words] == ts["word"]
    assert [{k: s[k] for k in ("segment", "start_offset", "end_offset", "start", "end")}
            for s in result.segments] == ts["segment"]


def test_batch_gives_every_row_its_single_result():
    meta, g = golden()
    net, tok = model()
    utts = meta["utterances"]
    waves = [audio(u) for u in utts]
    mel, mel_lens, enc, enc_lens = encode(waves)
    assert mel_lens.tolist() == g["batch.mel_len"].tolist() and enc_lens.tolist() == g["batch.enc_len"].tolist()
    longest = max(range(len(utts)), key=lambda i: len(waves[i]))
    for i, u in enumerate(utts):
        uid, n_mel, n_enc = u["id"], int(mel_lens[i]), int(enc_lens[i])
        ref_mel = g.get(f"batch.{uid}.mel_valid", g[f"single.{uid}.mel"][0, :, :n_mel])  # longest: == single
        assert (i == longest) == (f"batch.{uid}.mel_valid" not in g)
        assert rel_err(mel[i, :, :n_mel], ref_mel) < MEL_TOL
        assert mel[i, :, n_mel:].abs().max().item() == 0.0  # padded frames are exactly zero, as NeMo's
        assert rel_err(enc[i, :n_enc], g[f"batch.{uid}.enc_valid"].T) < TOL
    hyps = GreedyTDT(net).decode(enc, enc_lens)
    for u, h in zip(utts, hyps):
        uid = u["id"]
        assert h.token_ids == g[f"batch.{uid}.token_ids"].tolist() == u["single"]["token_ids"]
        assert h.timesteps == g[f"batch.{uid}.timestep"].tolist() == u["single"]["timestep"]
        assert h.durations == u["single"]["token_duration"]  # NeMo's single result, not its batch record
        assert h.duration_indices == u["single"]["token_duration_index"]
        r = finalize(h, tok, net.cfg)
        assert r.text == u["batch"]["text"] == u["single"]["text"]
        assert [{k: w[k] for k in WORD_KEYS[:3]} for w in r.words] == u["single"]["word_offsets"]
    # The fixture does exercise NeMo's batch-duration bug: our batch rows are NOT NeMo's batch records.
    assert any(h.durations != g[f"batch.{u['id']}.token_duration"].tolist() for u, h in zip(utts, hyps))


def test_batch_composition_does_not_change_results():
    net, _ = model()
    utts = utterances()
    waves = [audio(u) for u in utts]
    rng = random.Random(0)
    dec = GreedyTDT(net)
    for _ in range(3):
        idx = rng.sample(range(len(utts)), rng.randint(2, len(utts)))
        _, _, enc, enc_lens = encode([waves[i] for i in idx])
        for i, h in zip(idx, dec.decode(enc, enc_lens)):
            assert hyp_fields(h) == {k: utts[i]["single"][k] for k in hyp_fields(h)}, (idx, i)


def test_padded_rows_change_nothing():
    """Rows of length 0 (the power-of-two padding used with CUDA graphs) stay inactive and alter no other row."""
    net, _ = model()
    utts = utterances()[:3]
    _, _, enc, enc_lens = encode([audio(u) for u in utts])
    dec = GreedyTDT(net)
    dec.bucket_rows = True  # 3 rows -> 4
    hyps = dec.decode(enc, enc_lens)
    assert len(hyps) == 3
    for u, h in zip(utts, hyps):
        assert hyp_fields(h) == {k: u["single"][k] for k in hyp_fields(h)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_matches_eager_and_nemo():
    from engine.parakeet import load_parakeet as load

    net, _ = load(NEMO, device="cuda")
    utts = utterances()
    waves = [audio(u) for u in utts]
    x, lens = pad_batch(waves)
    with torch.no_grad():
        _, _, enc, enc_lens = net.encode(x.cuda(), lens.cuda())
    graphed, eager = GreedyTDT(net, cuda_graphs=True), GreedyTDT(net, cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    for _ in range(2):  # the second call replays the captured graph
        for u, a, b in zip(utts, graphed.decode(enc, enc_lens), eager.decode(enc, enc_lens)):
            assert hyp_fields(a) == hyp_fields(b) == {k: u["single"][k] for k in hyp_fields(a)}, u["id"]


@pytest.mark.parametrize("uid", ["utt02", "utt04"])
def test_prediction_and_joint_traces(uid):
    """Every joint call (its inputs, raw logits, frame, argmaxes) and every prediction-network call that NeMo
    made, in order, against the same calls in our decoder (utt02 includes the max_symbols event)."""
    meta, g = golden()
    u = next(x for x in meta["utterances"] if x["id"] == uid)
    net, _ = model()
    _, _, enc, enc_lens = encode([audio(u)])
    p = f"trace.{uid}."
    assert rel_err(net.joint.enc(enc[0]), g[p + "enc_proj_all"]) < TOL
    joint_calls, pred_calls = [], []
    hooks = [net.joint.register_forward_hook(
                 lambda m, i, o: joint_calls.append((i[0].clone(), i[1].clone(), o.clone()))),
             net.prediction.register_forward_hook(
                 lambda m, i, o: pred_calls.append((i[0].clone(), *(x.clone() for x in o))))]
    try:
        hyp = GreedyTDT(net).decode(enc, enc_lens)[0]
    finally:
        for h in hooks:
            h.remove()
    n_joint = g[p + "joint_raw_logits"].shape[0]
    trace = meta["trace"]["utterances"][uid]
    assert len(joint_calls) == trace["n_joint_calls_total"] >= n_joint
    f = torch.cat([c[0] for c in joint_calls[:n_joint]])
    gg = torch.cat([c[1] for c in joint_calls[:n_joint]])
    raw = torch.cat([c[2] for c in joint_calls[:n_joint]])
    assert rel_err(f, g[p + "joint_f"]) < TOL and rel_err(gg, g[p + "joint_g"]) < TOL
    assert rel_err(raw, g[p + "joint_raw_logits"]) < TOL
    assert rel_err(torch.log_softmax(raw, -1), g[p + "joint_output"]) < TOL  # NeMo's CPU output form
    v = net.cfg.vocab_size
    assert raw[:, : v + 1].argmax(-1).tolist() == g[p + "argmax_label"].tolist()
    assert raw[:, v + 1 :].argmax(-1).tolist() == g[p + "argmax_duration_index"].tolist()
    frames = [int(torch.nonzero((net.joint.enc(enc[0]) == row).all(-1))[0]) for row in f]
    assert frames == g[p + "frame"].tolist()
    # Prediction calls: the first is the start symbol; ours run on every step, only emitting steps keep theirs.
    labels = [net.cfg.blank_id] + hyp.token_ids
    # NeMo's loop calls predict once more, with nothing kept, when an utterance ends on a blank (utt04).
    ends_on_blank = int(joint_calls[-1][2][0, : net.cfg.vocab_size + 1].argmax()) == net.cfg.blank_id
    assert trace["n_predict_calls_total"] - len(labels) == int(ends_on_blank)
    kept = [pred_calls[0]] + [c for c in pred_calls[1:] if int(c[0][0]) != net.cfg.blank_id]
    n_pred = g[p + "pred_out"].shape[0]
    assert [int(c[0][0]) for c in kept[:n_pred]] == labels[:n_pred] == g[p + "pred_input_label"].tolist()
    out = torch.cat([c[1] for c in kept[:n_pred]])
    h = torch.cat([c[2].transpose(0, 1) for c in kept[:n_pred]])  # [L, 1, H] per call -> [P, L, H]
    c = torch.cat([c[3].transpose(0, 1) for c in kept[:n_pred]])
    assert rel_err(out, g[p + "pred_out"]) < TOL
    assert rel_err(h, g[p + "pred_h"]) < TOL and rel_err(c, g[p + "pred_c"]) < TOL
    assert rel_err(net.joint.pred(out), g[p + "pred_proj"]) < TOL
    assert net.prediction.embed.weight[net.cfg.blank_id].abs().max().item() == 0.0


def test_max_symbols_forces_a_frame_advance():
    u = next(x for x in utterances() if x["id"] == "utt02")
    net, _ = model()
    _, _, enc, enc_lens = encode([audio(u)])
    hyp = GreedyTDT(net).decode(enc, enc_lens)[0]
    assert net.cfg.max_symbols == 10
    assert hyp.timesteps.count(5) == 10 and hyp.durations[hyp.timesteps.index(5):][:10] == [0] * 10
    assert hyp.timesteps[hyp.timesteps.index(5) + 10] == 6


# ---- family detection and the release format -------------------------------------------------------------


def extracted(tmp_path: Path, drop: str | None = None, edit_config=None, replace: dict | None = None) -> Path:
    """The fixture .nemo rewritten into tmp_path: members dropped, model_config.yaml edited, members replaced."""
    import yaml

    out = tmp_path / "edited.nemo"
    with tarfile.open(NEMO) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            if not m.isfile() or (drop and m.name.endswith(drop)):
                continue
            data = src.extractfile(m).read()
            if m.name.endswith("model_config.yaml") and edit_config:
                cfg = yaml.safe_load(data)
                edit_config(cfg)
                data = yaml.safe_dump(cfg, allow_unicode=True).encode()
            for suffix, content in (replace or {}).items():
                if m.name.endswith(suffix):
                    data = content
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_family_detection(tmp_path):
    assert detect_family(NEMO) == PARAKEET_TDT
    assert detect_family(FIXTURES / "tiny-canary-qwen" / "model") == CANARY_QWEN
    folder = tmp_path / "extracted"
    folder.mkdir()
    with tarfile.open(NEMO) as t:
        t.extractall(folder, filter="data")
    assert detect_family(folder) == PARAKEET_TDT
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        detect_family(tmp_path / "extracted" / ".." / "..")
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        detect_family("./no/such/model")


def test_extracted_folder_loads_the_same_model(tmp_path):
    with tarfile.open(NEMO) as t:
        t.extractall(tmp_path, filter="data")
    net, tok = load_parakeet(tmp_path)
    ref, _ = model()
    for (k, a), (k2, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_corrupted_nemo(tmp_path):
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(NemoError, match="not a readable .nemo"):
        load_parakeet(bad)
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(NEMO.read_bytes()[: NEMO.stat().st_size // 2])
    with pytest.raises((NemoError, CheckpointError), match="truncated.nemo"):
        load_parakeet(truncated)
    garbage = extracted(tmp_path, replace={"model_weights.ckpt": b"\x00" * 4096})
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_parakeet(garbage)


def test_nemo_without_tokenizer(tmp_path):
    with pytest.raises(NemoError, match="has no SentencePiece tokenizer"):
        load_parakeet(extracted(tmp_path, drop="_tokenizer.model"))


def test_wrong_family_config(tmp_path):
    def ctc(cfg):
        cfg["target"] = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"

    def rnnt(cfg):
        cfg["decoding"]["model_type"] = "rnnt"
        cfg["loss"]["loss_name"] = "default"

    with pytest.raises(ConfigError, match="EncDecCTCModelBPE.*not a Parakeet-TDT"):
        detect_family(extracted(tmp_path, edit_config=ctc))
    with pytest.raises(ConfigError, match="RNN-T model, not TDT"):
        load_parakeet(extracted(tmp_path, edit_config=rnnt))
    with pytest.raises(ConfigError, match="not a Parakeet-TDT"):  # a Canary-Qwen folder given as Parakeet
        load_parakeet(FIXTURES / "tiny-canary-qwen" / "model")


def test_strict_load_names_every_problem(tmp_path):
    def wider(cfg):
        cfg["joint"]["jointnet"]["joint_hidden"] = 32

    with pytest.raises(CheckpointError,
                       match=r"shape mismatch \(5\): joint.enc.bias: checkpoint \[64\] vs model \[32\]"):
        load_parakeet(extracted(tmp_path, edit_config=wider))

    def deeper(cfg):
        cfg["decoder"]["prednet"]["pred_rnn_layers"] = 2

    with pytest.raises(CheckpointError, match=r"missing \(4\).*prediction.lstm.weight_hh_l1"):
        load_parakeet(extracted(tmp_path, edit_config=deeper))

    def other_tokenizer(cfg):
        cfg["labels"] = cfg["labels"][:-1]
        cfg["decoder"]["vocab_size"] = cfg["joint"]["num_classes"] = len(cfg["labels"])

    with pytest.raises(CheckpointError, match="do not belong together"):
        load_parakeet(extracted(tmp_path, edit_config=other_tokenizer))


def test_real_size_v2_strict_load():
    """The reconstructed parakeet-tdt-0.6b-v2 config: 617,825,926 parameters (NeMo's count), every checkpoint
    tensor consumed with its NeMo name and shape."""
    cfg = config_from_yaml(V2_CONFIG)
    assert (cfg.vocab_size, cfg.blank_id, cfg.joint_outputs, cfg.durations) == (1024, 1024, 1030, (0, 1, 2, 3, 4))
    with torch.device("meta"):
        from engine.parakeet import ParakeetTDT

        shapes = ParakeetTDT(cfg).state_dict()
    names = checkpoint_names(cfg, list(shapes))
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (key, t) in zip(names, shapes.items()):
        tensors[name] = (torch.randn(t.shape, generator=gen) if t.is_floating_point()
                         else torch.zeros(t.shape, dtype=t.dtype))
    assert len(tensors) == 725  # NeMo's state_dict entries, buffers included (fixture README, section 4)
    net = build_from_state(cfg, tensors, "random v2 weights")
    assert count_parameters(net) == 617_825_926
    assert count_parameters(net.encoder) == 608_879_616
    assert count_parameters(net.prediction) == 7_219_840 and count_parameters(net.joint) == 1_726_470
    w = tensors["joint.joint_net.2.weight"]
    assert net.joint.out.weight.data_ptr() == w.data_ptr()  # assigned, not copied
    del tensors["encoder.layers.23.norm_out.bias"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): encoder.layers.23.norm_out.bias"):
        build_from_state(cfg, tensors, "random v2 weights")


# ---- tdt-tiny-2layer: a 2-layer prediction network, xscaling, encoder biases, a joint without dropout ---------

ROOT2 = FIXTURES / "tdt-tiny-2layer"


@lru_cache(maxsize=1)
def model2():
    from safetensors.torch import load_file

    return load_parakeet(ROOT2 / "model" / "parakeet.nemo"), json.loads((ROOT2 / "golden.json").read_text()), \
        load_file(str(ROOT2 / "golden.safetensors"))


def test_2layer_fixture_single_and_batched():
    """NeMo's own decode of tests/fixtures/tdt-tiny-2layer (made by its make_fixture.py): the settings v2 uses
    and tdt-tiny lacks (pred_rnn_layers 2), and xscaling, use_bias and joint_net.1 (no joint dropout)."""
    (net, tok), meta, g = model2()
    cfg = net.cfg
    assert (cfg.pred_rnn_layers, cfg.encoder.xscaling, cfg.encoder.use_bias, cfg.joint_out_index) == (2, True, True, 1)
    assert count_parameters(net) == meta["n_parameters"]
    utts = meta["utterances"]
    waves = [audio(u) for u in utts]
    dec = GreedyTDT(net)
    singles = []
    for u, w in zip(utts, waves):
        _, _, enc, enc_lens = encode_with(net, [w])
        assert enc_lens.tolist() == g[f"single.{u['id']}.enc_len"].tolist()
        assert rel_err(enc, g[f"single.{u['id']}.enc"].transpose(1, 2)) < TOL
        singles.append(dec.decode(enc, enc_lens)[0])
    _, _, enc, enc_lens = encode_with(net, waves)
    for u, h, hb in zip(utts, singles, dec.decode(enc, enc_lens)):
        want = {k: u["single"][k] for k in ("token_ids", "timestep", "token_duration")}
        assert {k: v for k, v in hyp_fields(h).items() if k in want} == want, u["id"]
        assert hyp_fields(hb) == hyp_fields(h), u["id"]
        r = finalize(h, tok, cfg)
        ts = u["transcribe_single_timestamps"]
        assert r.text == u["single"]["text"] == ts["text"]
        assert [{k: w[k] for k in WORD_KEYS} for w in r.words] == ts["word"]
        assert [{k: s[k] for k in ("segment", "start_offset", "end_offset", "start", "end")}
                for s in r.segments] == ts["segment"]


def encode_with(net, waves):
    x, lens = pad_batch(waves)
    with torch.no_grad():
        return net.encode(x, lens)


def test_hub_ids_fetch_only_what_the_family_needs(tmp_path, monkeypatch):
    """A hub id: small files first; a Canary-Qwen repo (config.json) never has its .nemo fetched; a Parakeet
    repo's .nemo is; several .nemo files are refused. The download itself is engine.checkpoint._download."""
    import shutil

    import engine.checkpoint as checkpoint

    repos = {"nvidia/canary-qwen-2.5b": {"config.json": (FIXTURES / "tiny-canary-qwen" / "model" / "config.json"),
                                         "extra.nemo": NEMO},
             "nvidia/parakeet-tdt-0.6b-v2": {"parakeet-tdt-0.6b-v2.nemo": NEMO},
             "someone/two-nemos": {"a.nemo": NEMO, "b.nemo": NEMO}}
    calls = []

    def fake_download(repo_id, patterns, what):
        import fnmatch

        calls.append((repo_id, tuple(patterns)))
        root = tmp_path / repo_id.replace("/", "--") / str(len(calls))
        root.mkdir(parents=True)
        for name, src in repos[repo_id].items():
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                shutil.copy(src, root / name)
        return root

    monkeypatch.setattr(checkpoint, "_download", fake_download)
    assert detect_family("nvidia/canary-qwen-2.5b") == CANARY_QWEN
    assert all("*.nemo" not in p for _, p in calls)
    calls.clear()
    assert detect_family("nvidia/parakeet-tdt-0.6b-v2") == PARAKEET_TDT
    assert [("*.nemo" in p) for _, p in calls] == [False, True]
    net, _ = load_parakeet("nvidia/parakeet-tdt-0.6b-v2")
    assert count_parameters(net) == count_parameters(model()[0])
    with pytest.raises(NemoError, match="several .nemo files"):
        load_parakeet("someone/two-nemos")
