"""Qwen3 decoder with unmerged LoRA, numerically matching Hugging Face ``Qwen3ForCausalLM`` + PEFT (eval).

Parameter names follow the checkpoint after a short rename (``llm.base_model.model.model.`` -> ``llm.``,
``.base_layer.`` and ``.default`` dropped): see ``engine/checkpoint.py``.
"""

from __future__ import annotations

import math

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


class FusedLinear:
    """Several bias-free LoraLinears over the same input as one GEMM: ``x -> cat([p(x) for p in parts], -1)``.

    The weights are concatenated along the output dim and each part's ``weight`` is re-pointed to its rows
    of the fused tensor (same values, no copy kept). LoRA adapters (if any part has one, all with the same
    scale) become one A = cat(A_i) [sum r, in] and one block-diagonal B [sum out, sum r] (zeros off the
    blocks), i.e. two more GEMMs instead of two per adapted part; a power-of-two scale (alpha / r usually
    is) is folded into B, exactly. Not a module: nothing new in state_dict.
    """

    def __init__(self, parts: list[LoraLinear]):
        self.weight = torch.cat([p.weight.detach() for p in parts])  # [sum out, in]
        at = 0
        for p in parts:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(self.weight[at : at + n], requires_grad=False)  # a view: no copy kept
            at += n
        adapted = [p for p in parts if p.has_lora]
        self.lora_A = self.lora_B = None
        self.scale, self.fold = 0.0, 1.0
        if adapted:
            if len({p.scale for p in adapted}) != 1:
                raise ValueError("fused LoRA parts must share one scale")
            self.scale = adapted[0].scale
            if math.frexp(self.scale)[0] == 0.5:  # a power of two: folding it into B is exact, one op less
                self.fold = self.scale
                self.scale = 1.0
            self.lora_A = torch.cat([p.lora_A.weight.detach() for p in adapted])  # [sum r, in]
            ranks = [p.lora_A.weight.shape[0] for p in adapted]
            self.lora_B = self.weight.new_zeros(self.weight.shape[0], sum(ranks))  # [sum out, sum r]
            row, col = 0, 0
            for p in parts:
                n = p.weight.shape[0]
                if p.has_lora:
                    r = p.lora_A.weight.shape[0]
                    self.lora_B[row : row + n, col : col + r] = p.lora_B.weight.detach() * self.fold
                    col += r
                row += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.lora_A is not None:
            lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
            y = y + (lora if self.scale == 1.0 else lora * self.scale)
        return y


def attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """q [B, h, q, hd], k/v [B, kvh, kv, hd]; mask [B, 1, q, kv] bool (True = attend) or None for causal
    (queries aligned with the last keys; used on right-padded prompts) -> [B, h, q, hd]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


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
    are written and positions ``0..start+q`` returned; the caller advances ``start``. A cache may instead
    have ``attend(layer, q, k, v, mask, scale) -> [B, h, q, hd]``: it stores k/v and computes the attention
    itself (the paged decoder, engine.backends.decoder_torch).
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
        self._qkv: FusedLinear | None = None  # set by fuse()

    def forward(self, x, cos, sin, mask, cache, layer: int):
        """x: [B, q, hidden]; cos/sin: [B, q, hd]; mask: [B, 1, q, kv] bool (True = attend), or None: causal
        within x (right padding only: padding keys lie beyond every valid query)."""
        b, q, _ = x.shape
        if self._qkv is not None:  # one GEMM, split into views
            qs, ks, vs = self._qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        else:
            qs, ks, vs = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # q_norm / k_norm are per-head RMSNorms applied before RoPE.
        qs = self.q_norm(qs.view(b, q, self.n_heads, self.hd)).transpose(1, 2)  # [B, h, q, hd]
        ks = self.k_norm(ks.view(b, q, self.n_kv, self.hd)).transpose(1, 2)  # [B, kvh, q, hd]
        vs = vs.view(b, q, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, q, hd]
        qs = qs * cos + rotate_half(qs) * sin
        ks = ks * cos + rotate_half(ks) * sin
        if hasattr(cache, "attend"):  # the cache stores k/v and computes attention itself (paged decoder)
            out = cache.attend(layer, qs, ks, vs, mask, self.hd**-0.5)
        else:
            if cache is not None:
                ks, vs = cache.update(layer, ks, vs)  # [B, kvh, kv, hd]
            out = attention(qs, ks, vs, mask, self.hd**-0.5)  # [B, h, q, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, q, self.n_heads * self.hd))

    def fuse(self) -> None:
        """One GEMM for q, k and v (see FusedLinear); the three projections stay usable (views)."""
        self._qkv = FusedLinear([self.q_proj, self.k_proj, self.v_proj])


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoraConfig | None):
        super().__init__()

        def lin(name, d_in, d_out):
            return LoraLinear(d_in, d_out, lora if lora and name in lora.target_modules else None)

        self.gate_proj = lin("gate_proj", cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin("up_proj", cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin("down_proj", cfg.intermediate_size, cfg.hidden_size)
        self._gate_up: FusedLinear | None = None  # set by fuse()

    def forward(self, x):
        if self._gate_up is not None:
            gate, up = self._gate_up(x).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse(self) -> None:
        self._gate_up = FusedLinear([self.gate_proj, self.up_proj])


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
        """x: [B, q, hidden]; position_ids: [B, q]; mask: [B, 1, q, kv] bool (True = attend) or None (causal
        within x, right padding only); cache: see KVCache (None: attend within x only)."""
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
        if self.fused:  # rebuild the fused weights without the adapters
            self.fuse()

    @property
    def fused(self) -> bool:
        return self.layers[0].self_attn._qkv is not None

    @torch.no_grad()
    def fuse(self) -> None:
        """Concatenate q/k/v and gate/up weights (and their LoRA adapters) for one GEMM each. Call once the
        model is on its device and dtype (``.to()`` afterwards would not move the fused copies); the
        checkpoint parameters keep their names and become views into the fused tensors (no extra memory)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
