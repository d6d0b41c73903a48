"""Frozen configuration dataclasses, read from the release ``config.json`` and the base LLM's config.

Every size the model uses comes from here; nothing else in ``engine/`` may assume a dimension. Settings
the implementation does not reproduce (another normalisation, another attention model, ...) are refused
at load time with a message naming the key, rather than silently computed differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing a key or asks for something this engine does not implement."""


def _require(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{source}: missing key {key!r}")
    return cfg[key]


def _expect(value: Any, allowed: tuple, key: str, source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {key}={value!r} is not supported (supported: {list(allowed)})")


@dataclass(frozen=True)
class FrontendConfig:
    """NeMo ``AudioToMelSpectrogramPreprocessor`` settings (inference subset)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400  # samples (window_size * sample_rate)
    hop_length: int = 160  # samples (window_stride * sample_rate)
    n_mels: int = 128
    preemph: float = 0.97
    mag_power: float = 2.0
    log_guard: float = 2.0**-24  # NeMo's "add" log zero guard
    norm_eps: float = 1e-5  # added to the per-feature std
    pad_value: float = 0.0

    @classmethod
    def from_nemo(cls, cfg: dict, source: str) -> "FrontendConfig":
        sr = int(cfg.get("sample_rate", 16000))
        _expect(cfg.get("normalize", "per_feature"), ("per_feature",), "preprocessor.normalize", source)
        _expect(cfg.get("window", "hann"), ("hann",), "preprocessor.window", source)
        _expect(bool(cfg.get("log", True)), (True,), "preprocessor.log", source)
        _expect(int(cfg.get("frame_splicing", 1)), (1,), "preprocessor.frame_splicing", source)
        _expect(cfg.get("pad_to", 0), (0, None), "preprocessor.pad_to", source)
        _expect(bool(cfg.get("exact_pad", False)), (False,), "preprocessor.exact_pad", source)
        _expect(cfg.get("log_zero_guard_type", "add"), ("add",), "preprocessor.log_zero_guard_type", source)
        guard = cfg.get("log_zero_guard_value", 2.0**-24)
        if not isinstance(guard, (int, float)):
            raise ConfigError(f"{source}: preprocessor.log_zero_guard_value={guard!r} must be a number")
        preemph = cfg.get("preemph", 0.97)
        if preemph is None:
            raise ConfigError(f"{source}: preprocessor.preemph=None is not supported")
        return cls(
            sample_rate=sr,
            n_fft=int(_require(cfg, "n_fft", source)),
            win_length=int(round(float(_require(cfg, "window_size", source)) * sr)),
            hop_length=int(round(float(_require(cfg, "window_stride", source)) * sr)),
            n_mels=int(_require(cfg, "features", source)),
            preemph=float(preemph),
            mag_power=float(cfg.get("mag_power", 2.0)),
            log_guard=float(guard),
            pad_value=float(cfg.get("pad_value", 0.0)),
        )

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1


@dataclass(frozen=True)
class EncoderConfig:
    """FastConformer encoder (NeMo ``ConformerEncoder``, rel-pos attention, dw_striding subsampling)."""

    feat_in: int
    n_layers: int
    d_model: int
    n_heads: int
    ff_expansion_factor: int
    conv_kernel_size: int
    subsampling_factor: int
    subsampling_conv_channels: int
    xscaling: bool
    pos_emb_max_len: int
    use_bias: bool = True  # biases in the feed-forward, attention and conv-module layers (Parakeet: false)

    @classmethod
    def from_nemo(cls, cfg: dict, source: str) -> "EncoderConfig":
        _expect(cfg.get("self_attention_model", "rel_pos"), ("rel_pos",), "encoder.self_attention_model", source)
        _expect(cfg.get("subsampling", "dw_striding"), ("dw_striding",), "encoder.subsampling", source)
        _expect(cfg.get("conv_norm_type", "batch_norm"), ("batch_norm",), "encoder.conv_norm_type", source)
        _expect(bool(cfg.get("untie_biases", True)), (True,), "encoder.untie_biases", source)
        _expect(bool(cfg.get("causal_downsampling", False)), (False,), "encoder.causal_downsampling", source)
        _expect(cfg.get("feat_out", -1), (-1, None), "encoder.feat_out", source)
        _expect(cfg.get("reduction", None), (None,), "encoder.reduction", source)
        _expect(cfg.get("conv_context_size", None), (None,), "encoder.conv_context_size", source)
        ctx = cfg.get("att_context_size", [-1, -1])
        if list(ctx) != [-1, -1]:
            raise ConfigError(f"{source}: encoder.att_context_size={ctx!r} is not supported (only [-1, -1])")
        factor = int(_require(cfg, "subsampling_factor", source))
        if factor < 2 or factor & (factor - 1):
            raise ConfigError(f"{source}: encoder.subsampling_factor={factor} must be a power of two >= 2")
        kernel = int(cfg.get("conv_kernel_size", 31))  # NeMo ConformerEncoder defaults from here on
        if kernel % 2 == 0:
            raise ConfigError(f"{source}: encoder.conv_kernel_size={kernel} must be odd")
        d_model, n_heads = int(_require(cfg, "d_model", source)), int(cfg.get("n_heads", 4))
        if d_model % n_heads:
            raise ConfigError(f"{source}: encoder.d_model={d_model} is not a multiple of n_heads={n_heads}")
        channels = int(cfg.get("subsampling_conv_channels", -1))
        return cls(
            feat_in=int(_require(cfg, "feat_in", source)),
            n_layers=int(_require(cfg, "n_layers", source)),
            d_model=d_model,
            n_heads=n_heads,
            ff_expansion_factor=int(cfg.get("ff_expansion_factor", 4)),
            conv_kernel_size=kernel,
            subsampling_factor=factor,
            subsampling_conv_channels=channels if channels > 0 else d_model,  # NeMo: -1 means d_model
            xscaling=bool(cfg.get("xscaling", True)),  # NeMo's ConformerEncoder default is True
            pos_emb_max_len=int(cfg.get("pos_emb_max_len", 5000)),
            use_bias=bool(cfg.get("use_bias", True)),  # NeMo's ConformerEncoder default is True
        )

    @property
    def n_stages(self) -> int:
        """Number of stride-2 convolutions in the subsampling."""
        return int(math.log2(self.subsampling_factor))

    @property
    def subsampled_feat(self) -> int:
        """Mel bins left after the subsampling convolutions (128 -> 16 for factor 8)."""
        f = self.feat_in
        for _ in range(self.n_stages):
            f = (f + 2 - 3) // 2 + 1
        return f


@dataclass(frozen=True)
class LLMConfig:
    """Qwen3 decoder (Hugging Face ``Qwen3Config`` fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> "LLMConfig":
        _expect(cfg.get("model_type", "qwen3"), ("qwen3",), "model_type", source)
        _expect(cfg.get("hidden_act", "silu"), ("silu",), "hidden_act", source)
        _expect(bool(cfg.get("attention_bias", False)), (False,), "attention_bias", source)
        if cfg.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        # transformers 4.x writes rope_theta/rope_scaling; 5.x writes rope_parameters.
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling")
        rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{source}: missing key 'rope_theta'")
        hidden, heads = int(_require(cfg, "hidden_size", source)), int(_require(cfg, "num_attention_heads", source))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
        return cls(
            vocab_size=int(_require(cfg, "vocab_size", source)),
            hidden_size=hidden,
            intermediate_size=int(_require(cfg, "intermediate_size", source)),
            num_layers=int(_require(cfg, "num_hidden_layers", source)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        )


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """PEFT LoRA adapter on the LLM's linear layers: ``y = W x + (alpha / r) * B(A(x))``."""

    r: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_nemo(cls, cfg: dict | None, source: str) -> "LoraConfig | None":
        if not cfg:
            return None
        if cfg.get("use_rslora") or cfg.get("use_dora"):
            raise ConfigError(f"{source}: lora.use_rslora / lora.use_dora are not supported")
        targets = tuple(cfg.get("target_modules") or ())
        for t in targets:
            _expect(t, LORA_TARGETS, "lora.target_modules", source)
        r = int(_require(cfg, "r", source))
        return cls(r=r, alpha=float(cfg.get("lora_alpha", r)), target_modules=targets)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the Canary-Qwen network (SALM) and its prompt."""

    frontend: FrontendConfig
    encoder: EncoderConfig
    llm: LLMConfig
    lora: LoraConfig | None
    audio_locator_tag: str
    pretrained_llm: str | None

    @classmethod
    def from_dicts(cls, salm: dict, llm: dict, salm_source: str, llm_source: str) -> "ModelConfig":
        perception = _require(salm, "perception", salm_source)
        _expect(salm.get("prompt_format", "qwen"), ("qwen",), "prompt_format", salm_source)
        adapter = (perception.get("modality_adapter") or {}).get("_target_", "IdentityConnector")
        if not adapter.endswith("IdentityConnector"):
            raise ConfigError(f"{salm_source}: modality_adapter {adapter!r} is not supported (only IdentityConnector)")
        llm_cfg = LLMConfig.from_hf(llm, llm_source)
        out_dim = int(perception.get("output_dim", llm_cfg.hidden_size))
        if out_dim != llm_cfg.hidden_size:
            raise ConfigError(
                f"{salm_source}: perception.output_dim={out_dim} differs from the LLM hidden_size="
                f"{llm_cfg.hidden_size} of {llm_source}: wrong base LLM?"
            )
        return cls(
            frontend=FrontendConfig.from_nemo(_require(perception, "preprocessor", salm_source), salm_source),
            encoder=EncoderConfig.from_nemo(_require(perception, "encoder", salm_source), salm_source),
            llm=llm_cfg,
            lora=LoraConfig.from_nemo(salm.get("lora"), salm_source),
            audio_locator_tag=str(salm.get("audio_locator_tag", "<|audioplaceholder|>")),
            pretrained_llm=salm.get("pretrained_llm"),
        )

    @classmethod
    def from_files(cls, salm_config: Path, llm_config: Path) -> "ModelConfig":
        return cls.from_dicts(read_json(salm_config), read_json(llm_config), str(salm_config), str(llm_config))


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
