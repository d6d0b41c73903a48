"""Loading: layouts (folder, NeMo 3.0, hub cache), strictness, clear errors; other sizes vs transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, pad_batch, rel_err
from engine.checkpoint import CheckpointError, build_model, resolve
from engine.config import ConfigError
from tiny_checkpoint import write_checkpoint

TINY = FIXTURES / "tiny-canary-qwen"


def copy_fixture(tmp_path):
    shutil.copytree(TINY / "model", tmp_path / "model")
    shutil.copytree(TINY / "llm", tmp_path / "llm")
    return tmp_path / "model", tmp_path / "llm"


def edit_weights(model_dir, fn):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def load(model_dir, llm_dir=None, **kw):
    return build_model(resolve(model_dir, llm_dir), **kw)


def test_every_tensor_consumed_and_filled():
    model, _ = load(TINY / "model", TINY / "llm")
    n_ckpt = len(load_file(str(TINY / "model" / "model.safetensors")))
    assert len(model.state_dict()) == n_ckpt
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


def test_one_error_lists_missing_unexpected_and_mismatched(tmp_path):
    model_dir, llm_dir = copy_fixture(tmp_path)

    def corrupt(t):
        del t["llm.base_model.model.model.layers.1.self_attn.k_norm.weight"]
        t["perception.encoder.layers.0.extra.weight"] = torch.zeros(3)
        t["perception.proj.bias"] = torch.zeros(7)

    edit_weights(model_dir, corrupt)
    with pytest.raises(CheckpointError) as e:
        load(model_dir, llm_dir)
    msg = str(e.value)
    assert str(model_dir / "model.safetensors") in msg
    assert "missing (1): llm.layers.1.self_attn.k_norm.weight" in msg
    assert "unexpected (1): perception.encoder.layers.0.extra.weight" in msg
    assert "perception.proj.bias: checkpoint [7] vs model [64]" in msg


def test_config_that_does_not_fit_the_weights(tmp_path):
    model_dir, llm_dir = copy_fixture(tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["perception"]["encoder"]["n_layers"] = 3
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): .*perception\.encoder\.layers\.2\."):
        load(model_dir, llm_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_weights_name_the_file(tmp_path, damage):
    model_dir, llm_dir = copy_fixture(tmp_path)
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        load(model_dir, llm_dir)


def test_missing_files_and_wrong_llm(tmp_path):
    model_dir, llm_dir = copy_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        resolve(tmp_path / "nowhere", llm_dir)
    (llm_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        resolve(model_dir, llm_dir)
    other = tmp_path / "other"
    _, other_llm = write_checkpoint(other)  # a Qwen3 config with another hidden size
    with pytest.raises(ConfigError, match="output_dim=64 differs from the LLM hidden_size=48"):
        load(model_dir, other_llm)


def test_unsupported_config_is_refused(tmp_path):
    model_dir, llm_dir = copy_fixture(tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["perception"]["preprocessor"]["normalize"] = "all_features"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="preprocessor.normalize='all_features' is not supported"):
        load(model_dir, llm_dir)


def test_nemo3_layout_with_tokenizer_and_llm_backbone_inside(tmp_path):
    model_dir, llm_dir = copy_fixture(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(llm_dir / f, model_dir / f)
    (model_dir / "llm_backbone").mkdir()
    shutil.copy(llm_dir / "config.json", model_dir / "llm_backbone" / "config.json")
    files = resolve(model_dir)  # no --llm, and pretrained_llm is a placeholder hub id: must not be used
    assert files.llm_config == model_dir / "llm_backbone" / "config.json"
    model, tok = build_model(files)
    ref, ref_tok = load(TINY / "model", TINY / "llm")
    assert tok.prompt_ids() == ref_tok.prompt_ids()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def _hub_cache(root, repo_id, folder):
    """Lay a folder out as a Hugging Face hub cache entry (refs/main -> snapshots/<commit>)."""
    entry = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_offline_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    _hub_cache(cache, "acme/tiny-canary", TINY / "model")
    _hub_cache(cache, "fixture/tiny-qwen3", TINY / "llm")  # the pretrained_llm named in config.json
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    files = resolve("acme/tiny-canary")
    assert files.weights.is_file() and files.tokenizer_dir.name == files.llm_config.parent.name
    model, tok = build_model(files)
    assert tok.audio_id == 405
    with pytest.raises(FileNotFoundError, match="'acme/absent': could not fetch from the hub"):
        resolve("acme/absent")


def hf_qwen3(llm_cfg: dict, model):
    """transformers' Qwen3ForCausalLM with our weights, LoRA folded in float64 (an independent reference)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in llm_cfg.items() if k != "architectures"})
    cfg._attn_implementation = "eager"
    ref = Qwen3ForCausalLM(cfg).eval()
    state = {}
    for name, t in model.llm.state_dict().items():
        if ".lora_" in name:
            continue
        mod = name.rsplit(".", 1)[0]
        sub = model.llm.get_submodule(mod)
        if getattr(sub, "has_lora", False):
            t = (t.double() + sub.scale * sub.lora_B.weight.double() @ sub.lora_A.weight.double()).float()
        state["model." + name] = t
    state["model.embed_tokens.weight"] = model.embed_tokens.weight
    state["lm_head.weight"] = model.embed_tokens.weight
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.mark.parametrize("variant", [
    dict(enc={"xscaling": True, "subsampling_factor": 4, "n_heads": 4, "d_model": 32, "n_layers": 2},
         llm={"num_key_value_heads": 1}, lora={"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
         n_mels=80),
    dict(enc={"conv_kernel_size": 5, "subsampling_conv_channels": 4},
         llm={"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8, "num_hidden_layers": 1},
         lora={"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]},
         n_mels=64),
])
def test_other_sizes_load_run_and_match_transformers(tmp_path, variant):
    model_dir, llm_dir = write_checkpoint(tmp_path, **variant)
    model, tok = load(model_dir, llm_dir)
    enc = variant["enc"]
    assert model.cfg.encoder.xscaling == enc.get("xscaling", False)
    waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1 for n in (3000, 16000, 9999)]
    x, lens = pad_batch(waves)
    with torch.no_grad():
        mel, mel_lens, enc_out, enc_lens, emb = model.perception(x, lens)
    factor = enc.get("subsampling_factor", 8)
    assert mel.shape[1] == variant["n_mels"]
    assert enc_lens.tolist() == [-(-int(n) // factor) for n in mel_lens]  # ceil(mel_len / factor)
    assert torch.isfinite(emb).all()
    # The LLM (LoRA unmerged) against transformers on a left-padded batch with spliced audio.
    embeds, mask = model.splice([tok.prompt_ids()] * 3, tok.audio_id, [emb[i, : enc_lens[i]] for i in range(3)])
    llm_cfg = json.loads((llm_dir / "config.json").read_text())
    ref = hf_qwen3(llm_cfg, model)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model.forward_logits(embeds, mask)
        theirs = ref(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos).logits
    assert rel_err(ours[mask], theirs[mask]) < 1e-5


def test_xscaling_changes_the_encoder(tmp_path):
    on_dir, on_llm = write_checkpoint(tmp_path / "on", enc={"xscaling": True})
    off_dir, off_llm = write_checkpoint(tmp_path / "off", enc={"xscaling": False})
    x, lens = pad_batch([torch.randn(8000, generator=torch.Generator().manual_seed(1)) * 0.1])
    with torch.no_grad():
        on = load(on_dir, on_llm)[0].perception(x, lens)[-1]
        off = load(off_dir, off_llm)[0].perception(x, lens)[-1]
    assert rel_err(on, off) > 1e-2
