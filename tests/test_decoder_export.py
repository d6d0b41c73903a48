"""Decoder build (build/build_decoder.py): LoRA-merged hf/ checkpoint, TensorRT-LLM checkpoint, metadata,
engine sizes and command line; the TensorRT-LLM backend's request building. CPU, no downloads.

References: NeMo 3.0's golden logits and ids, transformers' Qwen3ForCausalLM loading hf/ (independent of
this package), and the TensorRT-LLM name table of shared/spec/tensorrt.md spelled out again below.
Tests that need TensorRT-LLM itself are marked ``trtllm`` and skip without it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FIXTURES, rel_err
from engine.backends.base import DecodeRequest
from engine.backends.decoder_trtllm import (EngineInfo, audio_key, executor_config_kwargs, new_tokens,
                                            request_ids, request_kwargs)
from engine.checkpoint import file_sha256
from engine.config import LLMConfig, LoraConfig, ModelConfig
from engine.export.hf import export_tokenizer
from engine.export.trtllm import (DecoderBuildError, build_command, check_engine, decoder_sizes, read_metadata,
                                  trtllm_config, trtllm_weights)
from engine.llm import Qwen3
from tiny_checkpoint import salm_config, write_checkpoint

REPO = FIXTURES.parent.parent
TAG = "<|audioplaceholder|>"
QWEN3_1_7B = {  # Qwen/Qwen3-1.7B config.json (model.md section 1)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_position_embeddings": 40960, "hidden_act": "silu", "attention_bias": False,
}
RELEASE_PROMPT = [151644, 872, 198, 3167, 3114, 279, 2701, 25, 220, 151669, 151645, 198, 151644, 77091, 198]


def build_main():
    spec = importlib.util.spec_from_file_location("build_decoder", REPO / "build" / "build_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def run_build(model_dir, llm_dir, out, *extra):
    assert build_main()(["--model", str(model_dir), "--llm", str(llm_dir), "--output", str(out),
                         "--skip-engine", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def builds(golden, tmp_path_factory):
    """The golden checkpoint built in float32 and bfloat16 (--skip-engine)."""
    root = tmp_path_factory.mktemp("decoder")
    model_dir, llm_dir = golden.root / "model", golden.root / "llm"
    return {"float32": run_build(model_dir, llm_dir, root / "fp32", "--dtype", "float32", "--max-batch-size", "4"),
            "bfloat16": run_build(model_dir, llm_dir, root / "bf16", "--max-batch-size", "4")}


@pytest.fixture(scope="module")
def merged_fp32(golden):
    return golden.load(merge_lora=True)[0]


def teacher_forced(golden, stem, embed):
    """Golden prompt embeddings + embeddings of the golden generated ids: [1, L, H]."""
    ids = golden.tensors[f"single.{stem}.gen_ids"]
    return torch.cat([golden.tensors[f"single.{stem}.input_embeds"], embed(ids)[None]], 1)


# ---- LoRA merge and hf/ ------------------------------------------------------------------------------

def test_merged_lora_logits_match_unmerged_and_nemo(golden, fp32_model, merged_fp32):
    unmerged, _ = fp32_model
    assert not any(hasattr(m, "lora_A") for m in merged_fp32.modules())
    for stem in golden.stems:
        full = teacher_forced(golden, stem, unmerged.embed_tokens)
        mask = torch.ones(full.shape[:2], dtype=torch.bool)
        with torch.no_grad():
            merged, ref = merged_fp32.forward_logits(full, mask), unmerged.forward_logits(full, mask)
        assert rel_err(merged, ref) < 5e-6, stem  # measured ~8e-7: only the order of float32 sums differs
        assert rel_err(merged, golden.tensors[f"single.{stem}.logits"]) < 1e-5, stem


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_weights_are_the_engine_merge_cast_once(builds, merged_fp32, dtype):
    """hf/ holds exactly the engine's float32 merge (LoraLinear.merge), cast once to the export dtype."""
    hf = load_file(str(builds[dtype] / "hf" / "model.safetensors"))
    ref = {f"model.{k}": v for k, v in merged_fp32.llm.state_dict().items()}
    ref["model.embed_tokens.weight"] = merged_fp32.embed_tokens.weight
    assert set(hf) == set(ref)  # tied head: no lm_head.weight
    for k, v in ref.items():
        assert hf[k].dtype == getattr(torch, dtype) and torch.equal(hf[k], v.to(hf[k].dtype)), k
    cfg = json.loads((builds[dtype] / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["dtype"] == cfg["torch_dtype"] == dtype
    assert cfg["tie_word_embeddings"] is True


def test_hf_loads_in_transformers_and_matches_ours_and_nemo(golden, builds, fp32_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    ours, tok = fp32_model
    hf_dir = builds["float32"] / "hf"
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert type(ref) is Qwen3ForCausalLM
    for stem in golden.stems:
        full = teacher_forced(golden, stem, ref.get_input_embeddings())
        with torch.no_grad():
            theirs = ref(inputs_embeds=full).logits
            mine = ours.forward_logits(full, torch.ones(full.shape[:2], dtype=torch.bool))
            # generation_config.json makes transformers' default generate NeMo's greedy decoding
            prompt = golden.tensors[f"single.{stem}.input_embeds"]
            gen = ref.generate(inputs_embeds=prompt, attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
                               max_new_tokens=golden.max_new_tokens)
        assert rel_err(theirs, mine) < 1e-5, stem
        assert rel_err(theirs, golden.tensors[f"single.{stem}.logits"]) < 1e-5, stem
        assert gen[0].tolist() == golden.tensors[f"single.{stem}.gen_ids"].tolist(), stem
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert hf_tok.convert_tokens_to_ids(TAG) == tok.audio_id == golden.meta["special_ids"]["audio_locator_tag"]
    user, assistant = "<|im_start|>user\nTranscribe the following: " + TAG + "<|im_end|>\n", "<|im_start|>assistant\n"
    ids = hf_tok.encode(user, add_special_tokens=False) + hf_tok.encode(assistant, add_special_tokens=False)
    assert ids == tok.prompt_ids()
    assert hf_tok.decode([tok.audio_id] + ids[:1], skip_special_tokens=True) == ""


def test_real_qwen3_tokenizer_export_keeps_the_release_id(tmp_path):
    from transformers import AutoTokenizer

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    with gzip.open(FIXTURES / "qwen3-tokenizer" / "tokenizer.json.gz", "rb") as f:
        (src / "tokenizer.json").write_bytes(f.read())
    shutil.copy(FIXTURES / "qwen3-tokenizer" / "tokenizer_config.json", src)
    assert export_tokenizer(src, dst, TAG).audio_id == 151669
    hf_tok = AutoTokenizer.from_pretrained(str(dst))
    assert hf_tok.convert_tokens_to_ids(TAG) == 151669 and TAG in hf_tok.all_special_tokens
    user = "<|im_start|>user\nTranscribe the following: " + TAG + "<|im_end|>\n"
    assistant = hf_tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert hf_tok.encode(user, add_special_tokens=False) + assistant == RELEASE_PROMPT
    assert len(json.loads((dst / "tokenizer.json").read_text())["added_tokens"]) == 27  # Qwen3's 26 + the tag


# ---- trtllm_ckpt/ ------------------------------------------------------------------------------------

def qwen3_names_from_trtllm(w: dict[str, torch.Tensor], n_layers: int, q_rows: int, kv_rows: int) -> dict:
    """The inverse of shared/spec/tensorrt.md's table, written out independently of engine/export."""
    out = {"model.embed_tokens.weight": w["transformer.vocab_embedding.weight"],
           "model.norm.weight": w["transformer.ln_f.weight"]}
    for i in range(n_layers):
        t, h = f"transformer.layers.{i}.", f"model.layers.{i}."
        q, k, v = w[t + "attention.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        out |= {h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                h + "self_attn.q_norm.weight": w[t + "attention.q_layernorm.weight"],
                h + "self_attn.k_norm.weight": w[t + "attention.k_layernorm.weight"],
                h + "self_attn.o_proj.weight": w[t + "attention.dense.weight"],
                h + "input_layernorm.weight": w[t + "input_layernorm.weight"],
                h + "post_attention_layernorm.weight": w[t + "post_layernorm.weight"],
                h + "mlp.gate_proj.weight": w[t + "mlp.fc.weight"],
                h + "mlp.up_proj.weight": w[t + "mlp.gate.weight"],
                h + "mlp.down_proj.weight": w[t + "mlp.proj.weight"]}
    return out


CONFIG_FIELDS = {"architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_size", "intermediate_size", "hidden_act",
                 "norm_epsilon", "position_embedding_type", "rotary_embedding_dim", "max_position_embeddings",
                 "rotary_base", "rotary_scaling", "qwen_type", "seq_length", "attn_bias", "mlp_bias",
                 "use_logn_attn", "tie_word_embeddings", "num_labels", "mapping", "quantization"}


def check_config_consistent(cfg: dict, shapes: dict[str, list[int]], dtype: str):
    assert set(cfg) == CONFIG_FIELDS
    assert cfg["architecture"] == "Qwen3ForCausalLM" and cfg["qwen_type"] == "qwen3" and cfg["dtype"] == dtype
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["hidden_act"] == "silu"
    assert cfg["logits_dtype"] == "float32" and not cfg["attn_bias"] and not cfg["mlp_bias"]
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    v, h, hd = cfg["vocab_size"], cfg["hidden_size"], cfg["head_size"]
    assert shapes["transformer.vocab_embedding.weight"] == shapes["lm_head.weight"] == [v, h]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("transformer.layers.")}
    assert layers == set(range(cfg["num_hidden_layers"]))
    for i in layers:
        p = f"transformer.layers.{i}."
        qkv_rows = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
        assert shapes[p + "attention.qkv.weight"] == [qkv_rows, h]
        assert shapes[p + "attention.dense.weight"] == [h, cfg["num_attention_heads"] * hd]
        assert shapes[p + "attention.q_layernorm.weight"] == shapes[p + "attention.k_layernorm.weight"] == [hd]
        assert shapes[p + "mlp.fc.weight"] == shapes[p + "mlp.gate.weight"] == [cfg["intermediate_size"], h]
        assert shapes[p + "mlp.proj.weight"] == [h, cfg["intermediate_size"]]
    assert len(shapes) == 3 + 9 * len(layers)  # embedding, final norm, lm_head; 9 tensors per layer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_trtllm_checkpoint_maps_back_to_every_merged_tensor(builds, dtype):
    root = builds[dtype]
    hf = load_file(str(root / "hf" / "model.safetensors"))
    w = load_file(str(root / "trtllm_ckpt" / "rank0.safetensors"))
    cfg = json.loads((root / "trtllm_ckpt" / "config.json").read_text())
    check_config_consistent(cfg, {k: list(t.shape) for k, t in w.items()}, dtype)
    assert all(t.dtype == getattr(torch, dtype) for t in w.values())
    hd = cfg["head_size"]
    back = qwen3_names_from_trtllm(w, cfg["num_hidden_layers"], cfg["num_attention_heads"] * hd,
                                   cfg["num_key_value_heads"] * hd)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    assert torch.equal(w["lm_head.weight"], hf["model.embed_tokens.weight"])  # tied: an explicit copy
    llm = json.loads((root / "hf" / "config.json").read_text())
    assert (cfg["rotary_base"], cfg["norm_epsilon"], cfg["max_position_embeddings"]) == (
        llm["rope_theta"], llm["rms_norm_eps"], llm["max_position_embeddings"])


def test_real_size_conversion_shapes_and_engine_sizes_without_weights():
    """Qwen3-1.7B dimensions on the meta device: names, shapes, config and engine limits, no 5 GB needed."""
    llm = LLMConfig.from_hf(QWEN3_1_7B, "Qwen3-1.7B")
    with torch.device("meta"):
        body = Qwen3(llm, LoraConfig(r=128, alpha=256, target_modules=("q_proj", "v_proj")))
        body.merge_lora()
        hf = {f"model.{k}": v for k, v in body.state_dict().items()}
        hf["model.embed_tokens.weight"] = torch.empty(llm.vocab_size, llm.hidden_size)
    w = trtllm_weights(hf, llm)
    shapes = {k: list(t.shape) for k, t in w.items()}
    check_config_consistent(trtllm_config(llm, "bfloat16"), shapes, "bfloat16")
    assert shapes["transformer.layers.27.attention.qkv.weight"] == [4096, 2048]
    assert shapes["lm_head.weight"] == [151936, 2048] and len(shapes) == 255

    salm = salm_config({"n_layers": 32, "d_model": 1024, "n_heads": 8, "subsampling_conv_channels": 256}, None, 128,
                       2048, "Qwen/Qwen3-1.7B")
    cfg = ModelConfig.from_dicts(salm, QWEN3_1_7B, "config.json", "llm/config.json")
    sizes = decoder_sizes(cfg, len(RELEASE_PROMPT) - 1, max_batch_size=32, max_audio_seconds=40, max_new_tokens=256)
    assert sizes.max_audio_frames == 500  # 12.5 encoder frames per second (model.md section 1)
    assert sizes.max_input_len == 14 + 64 + 500 and sizes.max_seq_len == sizes.max_input_len + 256
    assert sizes.max_prompt_embedding_table_size == 32 * 500 and sizes.max_num_tokens >= sizes.max_input_len
    assert decoder_sizes(cfg, 14, 1, 0.4, 8).max_audio_frames == 5  # 40 mel frames -> ceil(40 / 8)
    cmd = build_command(REPO / "ckpt", REPO / "eng", sizes, "bfloat16")
    opts = dict(zip(cmd[cmd.index("--checkpoint_dir"):][::2], cmd[cmd.index("--checkpoint_dir"):][1::2]))
    assert opts == {"--checkpoint_dir": str(REPO / "ckpt"), "--output_dir": str(REPO / "eng"),
                    "--max_batch_size": "32", "--max_beam_width": "1", "--max_input_len": "578",
                    "--max_seq_len": "834", "--max_num_tokens": "8192", "--max_prompt_embedding_table_size": "16000",
                    "--kv_cache_type": "paged", "--remove_input_padding": "enable",
                    "--gpt_attention_plugin": "bfloat16", "--gemm_plugin": "bfloat16",
                    "--context_fmha": "enable", "--use_paged_context_fmha": "enable"}
    fp32 = build_command(REPO / "ckpt", REPO / "eng", sizes, "float32")
    assert fp32[fp32.index("--context_fmha") + 1] == fp32[fp32.index("--use_paged_context_fmha") + 1] == "disable"


def test_cli_on_real_llm_dimensions_one_layer(tmp_path):
    """Real hidden/heads/head_dim/MLP/LoRA rank with one layer and a small vocabulary (~50 M parameters)."""
    dims = {k: QWEN3_1_7B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "rope_theta")}
    model_dir, llm_dir = write_checkpoint(tmp_path / "ckpt", llm={**dims, "num_hidden_layers": 1},
                                          lora={"r": 128, "lora_alpha": 256, "target_modules": ["q_proj", "v_proj"]})
    out = run_build(model_dir, llm_dir, tmp_path / "out")
    cfg = json.loads((out / "trtllm_ckpt" / "config.json").read_text())
    with safe_open(str(out / "trtllm_ckpt" / "rank0.safetensors"), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    check_config_consistent(cfg, shapes, "bfloat16")
    assert shapes["transformer.layers.0.attention.qkv.weight"] == [4096, 2048]
    assert shapes["transformer.layers.0.mlp.fc.weight"] == [6144, 2048]


# ---- metadata ------------------------------------------------------------------------------------------

def test_metadata_records_source_sizes_and_tools(golden, builds):
    meta = read_metadata(builds["bfloat16"])
    assert meta["source"]["weights_sha256"] == file_sha256(golden.root / "model" / "model.safetensors")
    assert meta["dtype"] == "bfloat16" and meta["engine"] is None  # --skip-engine
    special = golden.meta["special_ids"]
    assert meta["tokens"]["audio_id"] == special["audio_locator_tag"]
    assert meta["tokens"]["eos_id"] == special["eos_<|im_end|>"]
    assert meta["tokens"]["pad_id"] == special["pad_<|endoftext|>"]
    assert meta["tokens"]["prompt_ids"] == golden.meta["per_utterance"][golden.stems[0]]["prompt_ids"]
    s = meta["sizes"]
    assert s["prompt_len"] == len(meta["tokens"]["prompt_ids"]) - 1 and s["max_audio_frames"] == 500
    assert s["max_prompt_embedding_table_size"] == 4 * 500 and meta["tools"]["torch"] == torch.__version__
    assert "--max_prompt_embedding_table_size" in meta["trtllm_build"]


def fake_engine_config(meta: dict) -> dict:
    """An engine config.json as trtllm-build writes it, agreeing with the metadata."""
    return {"pretrained_config": {"dtype": meta["dtype"], "vocab_size": meta["llm"]["vocab_size"],
                                  "hidden_size": meta["llm"]["hidden_size"]},
            "build_config": {k: meta["sizes"][k] for k in ("max_batch_size", "max_input_len", "max_seq_len",
                                                           "max_prompt_embedding_table_size")}}


def test_engine_check_refuses_what_does_not_fit(builds):
    meta = read_metadata(builds["bfloat16"])
    with pytest.raises(DecoderBuildError, match="no engine"):
        check_engine(meta, {}, "1.2.1", [9, 0])
    meta["engine"] = {"tensorrt_llm": "1.2.1", "gpu": "NVIDIA H100", "compute_capability": [9, 0]}
    good = fake_engine_config(meta)
    check_engine(meta, good, "1.2.1", [9, 0], meta["source"]["weights_sha256"])
    bad = json.loads(json.dumps(good))
    bad["pretrained_config"]["dtype"] = "float16"
    bad["build_config"]["max_prompt_embedding_table_size"] = 10
    with pytest.raises(DecoderBuildError) as e:
        check_engine(meta, bad, "1.2.0", [8, 0], "0" * 64)
    msg = str(e.value)
    for part in ("engine dtype='float16'", "max_prompt_embedding_table_size=10", "running 1.2.0",
                 "compute capability [9, 0]", "expected 000000000000"):
        assert part in msg


# ---- request building for the TensorRT-LLM backend -----------------------------------------------------

def golden_requests(golden, tok_meta: dict, max_new_tokens: int) -> list[DecodeRequest]:
    """One request per golden utterance (their audio embeddings have different lengths) plus a duplicate
    of the first audio under another id."""
    prompt, audio_id = tok_meta["prompt_ids"], tok_meta["audio_id"]
    at = prompt.index(audio_id)
    reqs = []
    for i, stem in enumerate(golden.stems + golden.stems[:1]):
        n = int(golden.tensors[f"single.{stem}.proj_lens"][0])
        audio = golden.tensors[f"single.{stem}.proj"][0, :n]
        reqs.append(DecodeRequest(100 + i, prompt[:at], audio, prompt[at + 1:], max_new_tokens))
    return reqs


@pytest.mark.parametrize("reuse", [True, False])
def test_request_building_for_a_mixed_batch(golden, builds, reuse):
    meta = read_metadata(builds["bfloat16"])
    info = EngineInfo.from_meta(meta)
    reqs = golden_requests(golden, meta["tokens"], max_new_tokens=24)
    eos, pad = golden.meta["special_ids"]["eos_<|im_end|>"], golden.meta["special_ids"]["pad_<|endoftext|>"]
    assert len({r.audio.shape[0] for r in reqs}) == len(golden.stems)  # mixed lengths
    keys = []
    for r in reqs:
        kw = request_kwargs(r, info, kv_cache_reuse=reuse)
        n, pre = r.audio.shape[0], len(r.pre_ids)
        ids = kw["input_token_ids"]
        v = info.vocab_size
        assert ids == r.pre_ids + list(range(v, v + n)) + r.post_ids and len(ids) == r.prompt_len
        assert (kw["end_id"], kw["pad_id"], kw["max_tokens"], kw["streaming"]) == (eos, pad, 24, True)
        table = kw["embedding_table"]
        assert table.shape == (n, info.hidden_size) and table.dtype == torch.bfloat16 and table.is_contiguous()
        assert torch.equal(table, r.audio.to(torch.bfloat16))
        extra = kw["input_token_extra_ids"]
        if not reuse:
            assert extra is None
            continue
        assert len(extra) == len(ids) and set(extra[:pre] + extra[pre + n:]) == {0}
        assert len(set(extra[pre:pre + n])) == 1 and 0 < extra[pre] < 2**63
        keys.append(extra[pre])
    if reuse:
        assert keys[-1] == keys[0]  # the same audio may share cache blocks
        assert len(set(keys[:-1])) == len(golden.stems)  # different audio never does


def test_request_building_refuses_what_the_engine_cannot_take(golden, builds):
    info = EngineInfo.from_meta(read_metadata(builds["bfloat16"]))
    ok = golden_requests(golden, read_metadata(builds["bfloat16"])["tokens"], 8)[0]
    h = info.hidden_size
    cases = {"audio frames": torch.zeros(info.max_audio_frames + 1, h),
             f"expected \\[T_enc, {h}\\]": torch.zeros(5, h // 2)}
    for match, audio in cases.items():
        with pytest.raises(ValueError, match=match):
            request_kwargs(DecodeRequest(1, ok.pre_ids, audio, ok.post_ids, 8), info, False)
    with pytest.raises(ValueError, match="exceed"):
        request_kwargs(DecodeRequest(1, ok.pre_ids, ok.audio, ok.post_ids, info.max_seq_len), info, False)


def test_request_ids_and_audio_key():
    assert request_ids([1, 2], 3, [4], 10, None) == ([1, 2, 10, 11, 12, 4], None)
    assert request_ids([1, 2], 3, [4], 10, 7) == ([1, 2, 10, 11, 12, 4], [0, 0, 7, 7, 7, 0])
    a = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert audio_key(a) == audio_key(a.clone()) != audio_key(a + 1e-3)
    assert audio_key(a) != audio_key(a.to(torch.bfloat16))  # the table's bytes, not its values, name the audio


def test_executor_settings(builds):
    fp32 = EngineInfo.from_meta(read_metadata(builds["float32"]))
    bf16 = EngineInfo.from_meta(read_metadata(builds["bfloat16"]))
    with pytest.raises(DecoderBuildError, match="paged context FMHA"):
        executor_config_kwargs(fp32, True, 0.8, True, None)
    kw = executor_config_kwargs(bf16, True, 0.7, True, None)
    assert kw == {"max_beam_width": 1, "max_batch_size": 4, "enable_block_reuse": True,
                  "free_gpu_memory_fraction": 0.7, "cuda_graph_mode": True, "cuda_graph_cache_size": 4}
    off = executor_config_kwargs(fp32, False, 0.8, False, 8)
    assert off["enable_block_reuse"] is False and (off["cuda_graph_mode"], off["cuda_graph_cache_size"]) == (False, 0)


def test_eos_is_reported_like_the_torch_decoder():
    assert new_tokens([5, 6], True, None, 9) == [5, 6, 9]  # runtime left the end id out
    assert new_tokens([5, 9], True, 4, 9) == [5, 9]  # runtime listed it
    assert new_tokens([], True, 9, 9) == []  # already reported in an earlier step
    assert new_tokens([5, 6], False, None, 9) == [5, 6]  # length limit or still running


# ---- with TensorRT-LLM (GPU machines with tensorrt_llm installed) -----------------------------------------

# The engine's q/k RMSNorms use eps 1e-5 where Qwen3 has 1e-6 (decoder_meta.json "known_differences"): a
# relative change of a few 1e-6 in q and k, which can flip only a near-tie. Greedy ids must agree with NeMo's
# up to the first step whose top-2 logit margin is below this; after it they may diverge.
NEAR_TIE = 1e-2


def agreeing_prefix(got: list[int], want: list[int], step_logits: torch.Tensor, near_tie: float = NEAR_TIE) -> int:
    """How many leading ids agree, raising AssertionError if they part before a near-tie step of the reference
    (``step_logits`` [steps, vocab]: the reference's logits at each generated step)."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            top2 = step_logits[i].float().topk(2).values
            assert (top2[0] - top2[1]).item() < near_tie, f"ids part at step {i} ({g} vs {w}), not at a near-tie"
            return i
    if len(got) != len(want):
        i = min(len(got), len(want))
        assert i < len(step_logits), f"one sequence stops at step {i}, the other goes on"
        top2 = step_logits[i].float().topk(2).values
        assert (top2[0] - top2[1]).item() < near_tie, f"lengths differ at step {i}, not at a near-tie"
    return min(len(got), len(want))


def test_agreeing_prefix_allows_divergence_only_at_a_near_tie():
    logits = torch.tensor([[5.0, 1.0, 0.0], [2.0, 2.0 - 1e-4, 0.0], [0.0, 3.0, 1.0]])
    assert agreeing_prefix([0, 0, 1], [0, 0, 1], logits) == 3
    assert agreeing_prefix([0, 1, 2], [0, 0, 1], logits) == 1  # parts at step 1, a near-tie
    with pytest.raises(AssertionError, match="not at a near-tie"):
        agreeing_prefix([1, 0, 1], [0, 0, 1], logits)  # parts at step 0: a clear winner


needs_trtllm = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_llm") is None or not torch.cuda.is_available(),
    reason="needs tensorrt_llm (NVIDIA's package index or container) and a CUDA GPU")


@pytest.mark.trtllm
@needs_trtllm
def test_engine_backend_reproduces_nemo_greedy_ids(golden, tmp_path):
    """Build a float32 engine of the golden checkpoint, decode every utterance in one in-flight batch."""
    from engine.backends.decoder_trtllm import TrtllmDecoder

    out = tmp_path / "dec"
    assert build_main()(["--model", str(golden.root / "model"), "--llm", str(golden.root / "llm"),
                         "--output", str(out), "--dtype", "float32", "--max-batch-size", "8"]) == 0
    meta = read_metadata(out)
    assert meta["engine"] is not None
    dec = TrtllmDecoder(out, expected_weights_sha256=file_sha256(golden.root / "model" / "model.safetensors"))
    try:
        reqs = golden_requests(golden, meta["tokens"], golden.max_new_tokens)
        for r in reqs:
            dec.add(DecodeRequest(r.request_id, r.pre_ids, r.audio.cuda(), r.post_ids, r.max_new_tokens))
        got: dict[int, list[int]] = {}
        for rid, toks in dec.step().items():
            got.setdefault(rid, []).extend(toks)
        dec.release(reqs[-1].request_id)  # cancel the duplicate while it runs: the others must be unaffected
        assert dec.active <= len(reqs) - 1
        while dec.active:
            for rid, toks in dec.step().items():
                got.setdefault(rid, []).extend(toks)
        for r, stem in zip(reqs, golden.stems):
            want = golden.tensors[f"single.{stem}.gen_ids"].tolist()
            agreeing_prefix(got[r.request_id], want, golden.tensors[f"single.{stem}.gen_step_logits"])
            # The final step names its reason: eos ("stop") unless max_new_tokens cut it ("length").
            ended = "stop" if got[r.request_id][-1] == meta["tokens"]["eos_id"] else "length"
            assert dec.finished[r.request_id] == ended
        assert not dec.failed
    finally:
        dec.close()
