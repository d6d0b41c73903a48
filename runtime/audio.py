"""Audio input: decode, downmix to mono, resample to 16 kHz float32.

Files and bytes are decoded by libsndfile (``soundfile``: WAV, FLAC, OGG/Vorbis/Opus, MP3, ...); resampling
uses soxr (the SoX resampler, high quality). Arrays and tensors need their sample rate. Every error names
the input it is about.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np

TARGET_RATE = 16000
MAX_CHANNELS = 64

AudioInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, "torch.Tensor"]  # noqa: F821


class AudioError(ValueError):
    """An input could not be turned into 16 kHz mono samples; the message names the input."""


def describe(source) -> str:
    """Short name of an input for messages: the path, or the kind of in-memory input."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None)
    return f"<{type(source).__name__} shape={tuple(shape) if shape is not None else '?'}>"


def _to_float(data: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1); floats pass through as float32."""
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.signedinteger):
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32, copy=False)
    raise AudioError(f"{name}: unsupported sample dtype {data.dtype}")


def _to_mono(data: np.ndarray, name: str) -> np.ndarray:
    """1-D stays; 2-D is [samples, channels] or [channels, samples]: channels are the smaller axis."""
    if data.ndim == 1:
        return data
    if data.ndim != 2:
        raise AudioError(f"{name}: expected 1-D or 2-D audio, got shape {data.shape}")
    if data.shape[0] < data.shape[1]:
        data = data.T  # [channels, samples] -> [samples, channels]
    if data.shape[1] > MAX_CHANNELS:
        raise AudioError(f"{name}: {data.shape[1]} channels is not plausible audio (shape {data.shape})")
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return samples
    import soxr

    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)


def _decode(data, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        samples, rate = sf.read(data, dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise AudioError(f"{name}: cannot decode audio ({e})") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{name}: cannot decode audio ({e})") from None
    return samples, rate


def load_audio(source: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """Any supported input -> float32 mono samples at 16 kHz, shape [N], N > 0, all finite.

    ``sample_rate`` is the rate of an in-memory array or tensor; encoded files and bytes carry their own.
    """
    name = describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{name}: no such file")
        samples, rate = _decode(str(path), name)
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(f"{name}: empty upload")
        samples, rate = _decode(io.BytesIO(bytes(source)), name)
    else:
        if sample_rate is None:
            raise AudioError(f"{name}: in-memory audio needs its sample_rate")
        if hasattr(source, "detach"):  # torch.Tensor, without importing torch here
            source = source.detach().cpu().float().numpy()
        samples, rate = _to_float(np.asarray(source), name), sample_rate
    if not isinstance(rate, (int, np.integer)) or not 1000 <= rate <= 768000:
        raise AudioError(f"{name}: implausible sample rate {rate!r}")
    samples = _to_mono(samples, name)
    if samples.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(resample(samples, int(rate)))
