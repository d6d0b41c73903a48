"""Write small random Canary-Qwen checkpoints in the release on-disk format, with any sizes.

Key names are spelled out here from the release layout (shared spec, section 2), independently of the
engine's own rename table, so the loader is tested against the format and not against itself.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import FIXTURES

TOKENIZER_SRC = FIXTURES / "tiny-canary-qwen" / "llm"


def salm_config(enc: dict, lora: dict | None, n_mels: int, llm_hidden: int, pretrained_llm: str) -> dict:
    encoder = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder", "att_context_size": [-1, -1],
        "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "d_model": 32, "feat_in": n_mels, "feat_out": -1,
        "ff_expansion_factor": 4, "n_heads": 2, "n_layers": 1, "pos_emb_max_len": 5000,
        "self_attention_model": "rel_pos", "subsampling": "dw_striding", "subsampling_conv_channels": 8,
        "subsampling_factor": 8, "untie_biases": True, "xscaling": False, "dropout": 0.1,
    }
    encoder.update(enc)
    return {
        "audio_locator_tag": "<|audioplaceholder|>",
        "lora": lora,
        "perception": {
            "encoder": encoder,
            "modality_adapter": {"_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                                 "d_model": encoder["d_model"]},
            "output_dim": llm_hidden,
            "preprocessor": {
                "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", "dither": 1e-05,
                "features": n_mels, "frame_splicing": 1, "log": True, "n_fft": 512, "normalize": "per_feature",
                "pad_to": 0, "pad_value": 0.0, "sample_rate": 16000, "window": "hann", "window_size": 0.025,
                "window_stride": 0.01,
            },
        },
        "pretrained_llm": pretrained_llm,
        "prompt_format": "qwen",
    }


def llm_config(**kw) -> dict:
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 48, "intermediate_size": 96, "max_position_embeddings": 4096, "model_type": "qwen3",
        "num_attention_heads": 3, "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "vocab_size": 512, "bos_token_id": 400,
        "eos_token_id": 402,
    }
    cfg.update(kw)
    return cfg


def release_tensors(salm: dict, llm: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the release key names, shaped from the two configs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=None):
        std = std if std is not None else 1.0 / math.sqrt(shape[-1] if len(shape) > 1 else 1.0)
        return torch.randn(*shape, generator=g) * std

    enc, pre = salm["perception"]["encoder"], salm["perception"]["preprocessor"]
    d, c, h = enc["d_model"], enc["subsampling_conv_channels"], enc["n_heads"]
    n_mels, k = pre["features"], enc["conv_kernel_size"]
    stages = int(math.log2(enc["subsampling_factor"]))
    f = n_mels
    for _ in range(stages):
        f = (f - 1) // 2 + 1
    t = {
        "perception.preprocessor.featurizer.window": torch.hann_window(400, periodic=False),
        "perception.preprocessor.featurizer.fb": torch.rand(1, n_mels, 257, generator=g) * 0.02,
        "perception.encoder.pre_encode.conv.0.weight": rnd(c, 1, 3, 3, std=0.3),
        "perception.encoder.pre_encode.conv.0.bias": rnd(c, std=0.1),
        "perception.encoder.pre_encode.out.weight": rnd(d, c * f),
        "perception.encoder.pre_encode.out.bias": rnd(d, std=0.1),
        "perception.proj.weight": rnd(llm["hidden_size"], d),
        "perception.proj.bias": rnd(llm["hidden_size"], std=0.1),
    }
    for s in range(stages - 1):
        dw, pw = 2 + 3 * s, 3 + 3 * s
        t |= {f"perception.encoder.pre_encode.conv.{dw}.weight": rnd(c, 1, 3, 3, std=0.3),
              f"perception.encoder.pre_encode.conv.{dw}.bias": rnd(c, std=0.1),
              f"perception.encoder.pre_encode.conv.{pw}.weight": rnd(c, c, 1, 1),
              f"perception.encoder.pre_encode.conv.{pw}.bias": rnd(c, std=0.1)}
    for i in range(enc["n_layers"]):
        p = f"perception.encoder.layers.{i}."
        for n in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            t[p + n + ".weight"] = 1 + rnd(d, std=0.1)
            t[p + n + ".bias"] = rnd(d, std=0.05)
        for ff in ("feed_forward1", "feed_forward2"):
            t |= {p + ff + ".linear1.weight": rnd(4 * d, d), p + ff + ".linear1.bias": rnd(4 * d, std=0.05),
                  p + ff + ".linear2.weight": rnd(d, 4 * d), p + ff + ".linear2.bias": rnd(d, std=0.05)}
        for n in ("q", "k", "v", "out"):
            t[p + f"self_attn.linear_{n}.weight"] = rnd(d, d)
            t[p + f"self_attn.linear_{n}.bias"] = rnd(d, std=0.05)
        t[p + "self_attn.linear_pos.weight"] = rnd(d, d)
        t[p + "self_attn.pos_bias_u"] = rnd(h, d // h, std=0.2)
        t[p + "self_attn.pos_bias_v"] = rnd(h, d // h, std=0.2)
        t |= {p + "conv.pointwise_conv1.weight": rnd(2 * d, d, 1), p + "conv.pointwise_conv1.bias": rnd(2 * d, std=0.05),
              p + "conv.depthwise_conv.weight": rnd(d, 1, k, std=0.3), p + "conv.depthwise_conv.bias": rnd(d, std=0.05),
              p + "conv.pointwise_conv2.weight": rnd(d, d, 1), p + "conv.pointwise_conv2.bias": rnd(d, std=0.05),
              p + "conv.batch_norm.weight": 1 + rnd(d, std=0.1), p + "conv.batch_norm.bias": rnd(d, std=0.05),
              p + "conv.batch_norm.running_mean": rnd(d, std=0.2),
              p + "conv.batch_norm.running_var": torch.exp(rnd(d, std=0.3)),
              p + "conv.batch_norm.num_batches_tracked": torch.tensor(1000)}
    hid, hd = llm["hidden_size"], llm["head_dim"]
    nq, nkv, inter = llm["num_attention_heads"], llm["num_key_value_heads"], llm["intermediate_size"]
    shapes = {"q_proj": (nq * hd, hid), "k_proj": (nkv * hd, hid), "v_proj": (nkv * hd, hid),
              "o_proj": (hid, nq * hd), "gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    lora = salm.get("lora") or {}
    targets, r = lora.get("target_modules", []), lora.get("r", 0)
    t["embed_tokens.weight"] = rnd(llm["vocab_size"], hid, std=0.5)
    for i in range(llm["num_hidden_layers"]):
        p = f"llm.base_model.model.model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rnd(hid, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(hid, std=0.1)
        t[p + "self_attn.q_norm.weight"] = 1 + rnd(hd, std=0.1)
        t[p + "self_attn.k_norm.weight"] = 1 + rnd(hd, std=0.1)
        for name, shape in shapes.items():
            mod = p + ("mlp." if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn.") + name
            if name in targets:
                t[mod + ".base_layer.weight"] = rnd(*shape)
                t[mod + ".lora_A.default.weight"] = rnd(r, shape[1])
                t[mod + ".lora_B.default.weight"] = rnd(shape[0], r, std=0.5 / math.sqrt(r))
            else:
                t[mod + ".weight"] = rnd(*shape)
    t["llm.base_model.model.model.norm.weight"] = 1 + rnd(hid, std=0.1)
    return t


def write_checkpoint(root: Path, enc: dict | None = None, llm: dict | None = None,
                     lora: dict | None = None, n_mels: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """root/model (config.json + bf16 model.safetensors) and root/llm (Qwen3 config + tokenizer)."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"} \
        if lora is None else lora
    lcfg = llm_config(**(llm or {}))
    scfg = salm_config(enc or {}, lora, n_mels, lcfg["hidden_size"], "fixture/tiny-random-qwen3")
    model_dir, llm_dir = root / "model", root / "llm"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(scfg, indent=1))
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in release_tensors(scfg, lcfg, seed).items()}
    save_file(tensors, str(model_dir / "model.safetensors"))
    shutil.copytree(TOKENIZER_SRC, llm_dir)
    (llm_dir / "config.json").write_text(json.dumps(lcfg, indent=1))
    return model_dir, llm_dir
