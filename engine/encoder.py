"""FastConformer encoder and the audio-to-LLM projection, numerically identical to NeMo in eval mode.

Module and parameter names equal the checkpoint's (``perception.encoder.*``, ``perception.proj``), so
loading is a strict state-dict load. Padding never changes a valid frame: the subsampling zeroes padded
time steps before every module, attention masks padded queries and keys, and the convolution module zeroes
padded frames before its depthwise convolution. That is what makes batch composition irrelevant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

NEG_INF = 10000.0  # NeMo's INF_VAL for masked attention scores


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True on valid positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def subsampled_lengths(cfg: EncoderConfig, lengths: torch.Tensor) -> torch.Tensor:
    """Encoder frames per utterance: each stride-2 conv (k=3, p=1) maps n -> (n - 1) // 2 + 1."""
    for _ in range(cfg.n_stages):
        lengths = torch.div(lengths + 2 - 3, 2, rounding_mode="floor") + 1
    return lengths


class ConvSubsampling(nn.Module):
    """dw_striding subsampling: conv -> ReLU -> (depthwise -> pointwise -> ReLU) x (stages - 1) -> Linear.

    ``conv`` indices match the checkpoint (0: conv, 1: ReLU, 2: dw, 3: pw, 4: ReLU, 5: dw, 6: pw, 7: ReLU).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c = cfg.subsampling_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(cfg.n_stages - 1):
            layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(c * cfg.subsampled_feat, cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, n_mels] -> [B, T', d_model], lengths [B] -> [B]."""
        x = x.unsqueeze(1)  # [B, 1, T, F]
        # Zero padded time steps before every module (ReLUs included) and after the last, as NeMo's
        # MaskedConvSequential does: a conv's receptive field would otherwise pull padding into valid frames.
        mask = length_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]  # [B, 1, T, 1]
        for layer in self.conv:
            x = layer(x * mask)
            if isinstance(layer, nn.Conv2d) and layer.stride[0] != 1:
                lengths = torch.div(lengths + 2 * layer.padding[0] - layer.kernel_size[0], layer.stride[0],
                                    rounding_mode="floor") + 1
                mask = length_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]
        x = x * mask
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # [B, T', C * F'] channel-major, as NeMo flattens
        return self.out(x), lengths


def relative_positions(length: int, d_model: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal table for relative positions (T-1) ... -(T-1): [1, 2T-1, d_model] float32.

    Same formula and float32 operations as NeMo's RelPositionalEncoding (exp-based inverse frequencies), so
    a slice of NeMo's precomputed table and this are bit-identical.
    """
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe.unsqueeze(0)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class RelPositionAttention(nn.Module):
    """Transformer-XL relative-position multi-head attention with untied biases (NeMo rel_pos)."""

    # Set by the fp16/bf16 ONNX export only: scores and softmax in this dtype (overflow-safe); None = model dtype.
    scores_dtype: torch.dtype | None = None

    def __init__(self, d_model: int, n_heads: int, bias: bool = True):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """[B, h, T, 2T-1] scores against relative positions -> same shape, row i shifted left by T-1-i."""
        b, h, t, p = x.shape
        x = F.pad(x, (1, 0))  # [B, h, T, 2T]
        x = x.view(b, h, p + 1, t)[:, :, 1:]  # [B, h, 2T-1, T]
        return x.reshape(b, h, t, p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, att_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d]; pos: [1, 2T-1, d]; att_mask: [B, T, T] True where query or key is padding."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)  # [B, T, h, dk]
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)  # [B, h, T, dk]
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos).view(pos.shape[0], -1, self.h, self.d_k).transpose(1, 2)  # [1, h, 2T-1, dk]
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [B, h, T, dk]
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        if self.scores_dtype is not None:
            q_u, q_v, k, p = (t.to(self.scores_dtype) for t in (q_u, q_v, k, p))
        ac = torch.matmul(q_u, k.transpose(-2, -1))  # [B, h, T, T]
        bd = self.rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))[..., :t]  # [B, h, T, T]
        scores = (ac + bd) / math.sqrt(self.d_k)
        mask = att_mask.unsqueeze(1)  # [B, 1, T, T]
        attn = torch.softmax(scores.masked_fill(mask, -NEG_INF), dim=-1).masked_fill(mask, 0.0)
        out = torch.matmul(attn.to(v.dtype), v).transpose(1, 2).reshape(b, t, self.h * self.d_k)  # [B, T, d]
        return self.linear_out(out)


class ConvModule(nn.Module):
    """pointwise (d -> 2d) -> GLU -> zero padding -> depthwise (k) -> BatchNorm -> SiLU -> pointwise."""

    def __init__(self, d_model: int, kernel: int, bias: bool = True):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, padding=(kernel - 1) // 2, groups=d_model,
                                        bias=bias)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d]; pad_mask: [B, T] True on padding."""
        x = self.pointwise_conv1(x.transpose(1, 2))  # [B, 2d, T]
        x = F.glu(x, dim=1)  # [B, d, T]
        x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
        x = F.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)  # [B, T, d]


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d * cfg.ff_expansion_factor, cfg.use_bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionAttention(d, cfg.n_heads, cfg.use_bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, cfg.conv_kernel_size, cfg.use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d * cfg.ff_expansion_factor, cfg.use_bias)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos, att_mask, pad_mask):
        x = x + self.feed_forward1(self.norm_feed_forward1(x)) * 0.5
        x = x + self.self_attn(self.norm_self_att(x), pos, att_mask)
        x = x + self.conv(self.norm_conv(x), pad_mask)
        x = x + self.feed_forward2(self.norm_feed_forward2(x)) * 0.5
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """features [B, n_mels, T] + lengths -> encoded [B, T_enc, d_model] + lengths (padded frames not zeroed)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                pos_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos_table``: ``relative_positions(M, d_model)`` for some M >= T_enc (the ONNX export passes one
        sized for its maximum duration: an arange on the traced length would freeze it). Its centre 2T-1 rows
        are bit-identical to the table computed for T."""
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths)  # [B, T_enc, d]
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        t = x.shape[1]
        if pos_table is None:
            pos = relative_positions(t, self.cfg.d_model, x.device)
        else:
            m = (pos_table.shape[1] + 1) // 2
            pos = pos_table[:, m - t : m + t - 1]  # [1, 2T-1, d]: positions T-1 ... -(T-1)
        pos = pos.to(x.dtype)
        valid = length_mask(lengths, t)  # [B, T]
        att_mask = ~(valid[:, None, :] & valid[:, :, None])  # [B, T, T] True if query or key is padding
        pad_mask = ~valid
        for layer in self.layers:
            x = layer(x, pos, att_mask, pad_mask)
        return x, lengths
