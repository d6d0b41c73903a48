"""Audio input: decode, downmix to mono, resample to 16 kHz float32.

Files and bytes are decoded by libsndfile (``soundfile``: WAV, FLAC, OGG/Vorbis/Opus, MP3, ...), and what it
cannot read (M4A/AAC, WebM, ...) by FFmpeg through PyAV when that is installed (extra ``serving``); resampling
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
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        # libsndfile has no M4A/AAC or WebM; FFmpeg (through PyAV, optional) has. Its error is only a
        # second opinion, so the message keeps libsndfile's reason.
        fallback = _decode_av(data)
        if fallback is None:
            raise AudioError(f"{name}: cannot decode audio ({e})") from None
        samples, rate = fallback
    return samples, rate


def _decode_av(data) -> tuple[np.ndarray, int] | None:
    """Decode with FFmpeg via PyAV: [samples, channels] float32 and the rate; None if PyAV is missing, finds no
    audio stream, fails, or decodes nothing."""
    try:
        import av
    except ImportError:
        return None
    if hasattr(data, "seek"):
        data.seek(0)
    try:
        with av.open(data) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            to_planar = av.AudioResampler(format="fltp")  # keeps layout and rate: downmix/resample stay ours
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_planar.resample(frame)]
            chunks += [f.to_ndarray() for f in to_planar.resample(None)]
            rate = stream.codec_context.sample_rate
    except (av.FFmpegError, ValueError, OSError):
        return None
    if not chunks:
        return None
    return np.concatenate(chunks, axis=1).T, int(rate)  # [channels, samples] -> [samples, channels]


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
