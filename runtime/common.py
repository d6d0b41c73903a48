"""Types and helpers shared by the engine and the API facade: device and dtype choice, the result type."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .options import DTYPES

TRAINED_MAX_SECONDS = 40.0  # longest training audio; longer input degrades


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: bfloat16 on GPUs (as the official evaluation), float32 on CPUs (NeMo's own default)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {sorted(set(DTYPES))})")
    return DTYPES[dtype]


def pad_short(wave: np.ndarray, min_samples: int) -> np.ndarray:
    """Zero-pad a clip shorter than one hop to one hop. Below one hop the frontend has no frame at all (NeMo's
    per-feature normalisation divides by zero there); one hop gives all-zero features like any 1-frame clip."""
    return wave if len(wave) >= min_samples else np.pad(wave, (0, min_samples - len(wave)))


@dataclass
class Transcription:
    text: str  # decoded new tokens, special tokens skipped, surrounding whitespace stripped
    token_ids: list[int]  # generated ids, without the end-of-turn token
    duration: float  # seconds of audio
    finish_reason: str  # "stop": end of turn produced; "length": max_new_tokens reached; "cancelled"
    extra: dict = field(default_factory=dict)
    logprobs: list[float] | None = None  # natural-log probability of each token_ids entry, when the decoder gives them
