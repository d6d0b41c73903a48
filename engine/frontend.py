"""Log-mel frontend, numerically identical to NeMo's ``FilterbankFeatures`` in eval mode.

Always computed in float32, whatever the model dtype (NeMo disables autocast around it and the official
evaluation keeps it in fp32). The window and filterbank are the checkpoint's own buffers: they are stored
bf16-rounded, and recomputing them moves the features enough to change transcripts.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FrontendConfig


def feature_lengths(cfg: FrontendConfig, audio_lengths: torch.Tensor) -> torch.Tensor:
    """Valid mel frames per utterance: ``(L + 2 * (n_fft // 2) - n_fft) // hop`` (= L // 160 here)."""
    pad = cfg.n_fft // 2 * 2
    return torch.div(audio_lengths + pad - cfg.n_fft, cfg.hop_length, rounding_mode="floor").long()


def normalize_per_feature(x: torch.Tensor, lengths: torch.Tensor, eps: float) -> torch.Tensor:
    """Per utterance and mel bin: subtract the mean and divide by (unbiased std + eps) over valid frames.

    x: [B, n_mels, T]; frames t >= lengths[b] do not count. NaN std (a single frame) becomes 0, as NeMo.
    """
    valid = (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]).unsqueeze(1)  # [B, 1, T]
    count = valid.sum(dim=2)  # [B, 1]
    mean = torch.where(valid, x, 0.0).sum(dim=2) / count  # [B, n_mels]
    var_sum = torch.sum(torch.where(valid, x - mean.unsqueeze(2), 0.0) ** 2, dim=2)
    std = torch.sqrt(var_sum / (count - 1.0))
    std = std.masked_fill(std.isnan(), 0.0) + eps
    return (x - mean.unsqueeze(2)) / std.unsqueeze(2)


class MelFrontend(nn.Module):
    """audio [B, N] float32 + lengths [B] -> features [B, n_mels, N // hop + 1] + feature lengths [B]."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.cfg = cfg
        # Filled from the checkpoint (perception.preprocessor.featurizer.{window,fb}).
        self.register_buffer("window", torch.empty(cfg.win_length))
        self.register_buffer("fb", torch.empty(1, cfg.n_mels, cfg.n_freqs))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        audio = audio.float()
        seq_len = feature_lengths(cfg, lengths)
        # Pre-emphasis, then zero everything past each utterance's end (padding must not leak in).
        x = torch.cat((audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]), dim=1)
        inside = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        x = x.masked_fill(~inside, 0.0)
        spec = torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window.float(),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )  # [B, n_freqs, T]
        # Magnitude then power, in NeMo's order: sqrt(re^2 + im^2) ** 2 is not bit-equal to re^2 + im^2.
        mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))
        power = mag.pow(cfg.mag_power)
        mel = torch.matmul(self.fb.float(), power)  # [1, n_mels, n_freqs] @ [B, n_freqs, T] -> [B, n_mels, T]
        mel = torch.log(mel + cfg.log_guard)
        mel = normalize_per_feature(mel, seq_len, cfg.norm_eps)
        pad = torch.arange(mel.shape[2], device=mel.device)[None, :] >= seq_len[:, None]  # [B, T]
        return mel.masked_fill(pad.unsqueeze(1), cfg.pad_value), seq_len
