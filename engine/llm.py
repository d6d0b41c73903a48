"""Qwen3 decoder with unmerged LoRA, numerically matching Hugging Face ``Qwen3ForCausalLM`` + PEFT (eval).

Parameter names follow the checkpoint after a short rename (``llm.base_model.model.model.`` -> ``llm.``,
``.base_layer.`` and ``.default`` dropped): see ``engine/checkpoint.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig, LoraConfig


class RMSNorm(nn.Module):
    """Computes in float32 and casts back before the weight multiply, as Hugging Face's Qwen3RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoraLinear(nn.Module):
    """Bias-free linear layer with an optional unmerged LoRA branch: ``W x + B(A(x)) * scale``."""

    def __init__(self, d_in: int, d_out: int, lora: LoraConfig | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.scale = 0.0
        if lora is not None:
            self.lora_A = nn.Linear(d_in, lora.r, bias=False)
            self.lora_B = nn.Linear(lora.r, d_out, bias=False)
            self.scale = lora.scale

    @property
    def has_lora(self) -> bool:
        return hasattr(self, "lora_A")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.has_lora:
            y = y + self.lora_B(self.lora_A(x)) * self.scale
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight (in float32, then cast back) and drop it."""
        if not self.has_lora:
            return
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # [out, r] @ [r, in]
        self.weight.copy_((self.weight.float() + self.scale * delta).to(self.weight.dtype))
        del self.lora_A, self.lora_B


def rope_inv_freq(cfg: LLMConfig) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, computed on the CPU in float32 as transformers does."""
    exponent = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu") / cfg.head_dim
    return 1.0 / (cfg.rope_theta ** exponent)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """position_ids [B, T] -> cos, sin [B, T, head_dim] (neox layout: frequencies repeated twice)."""
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Contiguous per-layer key/value buffers [B, kv_heads, max_len, head_dim] for the reference generator.

    A cache is any object with ``update(layer, k, v) -> (keys, values)``: it stores the new keys/values
    [B, kv_heads, q, head_dim] and returns what the queries attend to. Here: positions ``start..start+q``
    are written and positions ``0..start+q`` returned; the caller advances ``start``.
    """

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.start = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.start + k.shape[2]
        self.k[layer][:, :, self.start : end] = k
        self.v[layer][:, :, self.start : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoraConfig | None):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def lin(name, d_in, d_out):
            return LoraLinear(d_in, d_out, lora if lora and name in lora.target_modules else None)

        self.q_proj = lin("q_proj", cfg.hidden_size, cfg.num_heads * cfg.head_dim)
        self.k_proj = lin("k_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.v_proj = lin("v_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
        self.o_proj = lin("o_proj", cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer: int):
        """x: [B, q, hidden]; cos/sin: [B, q, hd]; mask: [B, 1, q, kv] bool (True = attend)."""
        b, q, _ = x.shape
        # q_norm / k_norm are per-head RMSNorms applied before RoPE.
        qs = self.q_norm(self.q_proj(x).view(b, q, self.n_heads, self.hd)).transpose(1, 2)  # [B, h, q, hd]
        ks = self.k_norm(self.k_proj(x).view(b, q, self.n_kv, self.hd)).transpose(1, 2)  # [B, kvh, q, hd]
        vs = self.v_proj(x).view(b, q, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, q, hd]
        qs = qs * cos + rotate_half(qs) * sin
        ks = ks * cos + rotate_half(ks) * sin
        if cache is not None:
            ks, vs = cache.update(layer, ks, vs)  # [B, kvh, kv, hd]
        out = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=self.hd**-0.5, enable_gqa=self.n_heads != self.n_kv
        )  # [B, h, q, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoraConfig | None):
        super().__init__()

        def lin(name, d_in, d_out):
            return LoraLinear(d_in, d_out, lora if lora and name in lora.target_modules else None)

        self.gate_proj = lin("gate_proj", cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin("up_proj", cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin("down_proj", cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoraConfig | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, lora)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, lora)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """The transformer body: inputs_embeds -> final-norm hidden states. The LM head lives with the embeddings."""

    def __init__(self, cfg: LLMConfig, lora: LoraConfig | None):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, lora) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq = rope_inv_freq(cfg)  # not a buffer: derived, and must stay float32

    def forward(self, x, position_ids, mask, cache=None) -> torch.Tensor:
        """x: [B, q, hidden]; position_ids: [B, q]; mask: [B, 1, q, kv] bool (True = attend); cache: see
        KVCache (None: attend within x only)."""
        if self._inv_freq.device != x.device:
            self._inv_freq = self._inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self._inv_freq, position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def merge_lora(self) -> None:
        for m in self.modules():
            if isinstance(m, LoraLinear):
                m.merge()
