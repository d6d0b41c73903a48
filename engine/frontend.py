"""Log-mel frontend, numerically identical to NeMo's ``FilterbankFeatures`` in eval mode.

Always computed in float32, whatever the model dtype (NeMo disables autocast around it and the official
evaluation keeps it in fp32). The window and filterbank are the checkpoint's own buffers: they are stored
bf16-rounded, and recomputing them moves the features enough to change transcripts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import FrontendConfig


def feature_lengths(cfg: FrontendConfig, audio_lengths: torch.Tensor) -> torch.Tensor:
    """Valid mel frames per utterance: ``(L + 2 * (n_fft // 2) - n_fft) // hop`` (= L // 160 here)."""
    pad = cfg.n_fft // 2 * 2
    return torch.div(audio_lengths + pad - cfg.n_fft, cfg.hop_length, rounding_mode="floor").long()


def normalize_per_feature(x: torch.Tensor, lengths: torch.Tensor, eps: float) -> torch.Tensor:
    """Per utterance and mel bin: subtract the mean and divide by (unbiased std + eps) over valid frames.

    x: [B, n_mels, T]; frames t >= lengths[b] do not count. A single frame has std 0: NeMo gets 0/0 = NaN
    there and zeroes it; here no NaN is ever made (the same values), so none has to survive a compiler's fused
    kernels (a clip of 160-319 samples has one frame).
    """
    valid = (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]).unsqueeze(1)  # [B, 1, T]
    count = valid.sum(dim=2)  # [B, 1]
    mean = torch.where(valid, x, 0.0).sum(dim=2) / count  # [B, n_mels]
    var_sum = torch.sum(torch.where(valid, x - mean.unsqueeze(2), 0.0) ** 2, dim=2)
    # clamp: the branch where() drops must not compute 0/0 either.
    std = torch.where(count > 1, torch.sqrt(var_sum / (count - 1.0).clamp(min=1.0)), 0.0) + eps
    return (x - mean.unsqueeze(2)) / std.unsqueeze(2)


def preemphasize(cfg: FrontendConfig, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pre-emphasis, then zero everything past each utterance's end (padding must not leak in). [B, N]."""
    x = torch.cat((audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]), dim=1)
    inside = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x.masked_fill(~inside, 0.0)


def power_to_features(cfg: FrontendConfig, fb: torch.Tensor, power: torch.Tensor,
                      seq_len: torch.Tensor) -> torch.Tensor:
    """Power spectrum [B, n_freqs, T] -> normalised log-mel [B, n_mels, T], frames t >= seq_len set to pad_value."""
    mel = torch.matmul(fb.float(), power)  # [1, n_mels, n_freqs] @ [B, n_freqs, T] -> [B, n_mels, T]
    mel = torch.log(mel + cfg.log_guard)
    mel = normalize_per_feature(mel, seq_len, cfg.norm_eps)
    pad = torch.arange(mel.shape[2], device=mel.device)[None, :] >= seq_len[:, None]  # [B, T]
    return mel.masked_fill(pad.unsqueeze(1), cfg.pad_value)


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
        seq_len = feature_lengths(cfg, lengths)
        x = preemphasize(cfg, audio.float(), lengths)
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
        return power_to_features(cfg, self.fb, mag.pow(cfg.mag_power), seq_len), seq_len


def window_offset(cfg: FrontendConfig) -> int:
    """First sample of the window inside the n_fft frame (torch.stft centres a shorter window)."""
    return (cfg.n_fft - cfg.win_length) // 2


def dft_basis(cfg: FrontendConfig, window: torch.Tensor) -> torch.Tensor:
    """Windowed real DFT as convolution weights: [2 * n_freqs, 1, win_length] float32, cosines then sines.

    Row k holds w[m] cos(2 pi k n / n_fft) (row n_freqs + k: -w[m] sin(...)) for frame sample
    n = window_offset + m: only the window's taps, since the frame's other n_fft - win_length samples
    (112 of 512 here) are multiplied by zero. Built in float64 with k * n reduced mod n_fft, so each weight
    is the correctly rounded float32 of the exact value.
    """
    n = window_offset(cfg) + torch.arange(cfg.win_length, dtype=torch.float64)
    k = torch.arange(cfg.n_freqs, dtype=torch.float64)
    angle = 2 * torch.pi * torch.remainder(k[:, None] * n[None, :], cfg.n_fft) / cfg.n_fft  # [n_freqs, win]
    w = window.double()
    basis = torch.cat((torch.cos(angle) * w, -torch.sin(angle) * w))  # [2 * n_freqs, win_length]
    return basis.float().unsqueeze(1)


class ConvMelFrontend(nn.Module):
    """The export form of ``MelFrontend``: same inputs, outputs and steps, with the STFT computed as a strided
    Conv1d over a fixed windowed DFT basis, so the graph holds only operators the TensorRT ONNX parser
    supports (it has no STFT / DFT in TensorRT 10). Always float32.

    Not bit-equal to torch.stft (a direct 400-term sum over the window instead of an FFT): the difference is float32 rounding,
    amplified by log() in near-silent bins, like MelFrontend's own distance to NeMo.
    """

    def __init__(self, frontend: MelFrontend):
        super().__init__()
        self.cfg = frontend.cfg
        self.register_buffer("basis", dft_basis(self.cfg, frontend.window))
        self.register_buffer("fb", frontend.fb.detach().float().clone())

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        seq_len = feature_lengths(cfg, lengths)
        x = preemphasize(cfg, audio.float(), lengths)
        # center=True: frame t spans x[t * hop - n_fft // 2 :][: n_fft] (zeros outside), of which the window
        # covers win_length samples from window_offset on. Padding win_length in all keeps N // hop + 1 frames.
        left = cfg.n_fft // 2 - window_offset(cfg)
        x = F.pad(x.unsqueeze(1), (left, cfg.win_length - left))  # [B, 1, N + win_length]
        spec = F.conv1d(x, self.basis, stride=cfg.hop_length)  # [B, 2 * n_freqs, N // hop + 1]
        re, im = spec[:, : cfg.n_freqs], spec[:, cfg.n_freqs :]
        mag = torch.sqrt(re.pow(2) + im.pow(2))  # NeMo's order again: magnitude, then power
        return power_to_features(cfg, self.fb, mag.pow(cfg.mag_power), seq_len), seq_len
