"""Audio input: decode, downmix to mono, resample to 16 kHz float32.

Files and bytes are decoded by libsndfile (``soundfile``: WAV, FLAC, OGG/Vorbis/Opus, MP3, ...), and what it
cannot read (M4A/AAC, MP4, WebM, ...) by FFmpeg through PyAV (a core dependency); resampling
uses soxr (the SoX resampler, high quality). Arrays and tensors need their sample rate. Every error names
the input it is about.

Encoded input is decoded in blocks and downmixed block by block, so memory holds mono samples only, and with
``max_seconds`` decoding stops once past it: a few hundred KB of FLAC or Opus silence can decode to hours of
samples, which an upload limit in bytes does not bound.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from pathlib import Path
from typing import Iterator, Union

import numpy as np

TARGET_RATE = 16000
MAX_CHANNELS = 64
MIN_RATE, MAX_RATE = 1000, 768000
BLOCK_FRAMES = 1 << 16  # frames decoded per read: bounds a read's memory whatever the file declares

AudioInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, "torch.Tensor"]  # noqa: F821


class AudioError(ValueError):
    """An input could not be turned into 16 kHz mono samples; the message names the input."""


class AudioTooLong(AudioError):
    """The input is longer than the ``max_seconds`` its caller accepts (decoding stopped there)."""


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


def _check_rate(rate, name: str) -> None:
    if not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{name}: implausible sample rate {rate!r}")


def _check_length(frames: int, rate: int, max_seconds: float | None, name: str) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        raise AudioTooLong(f"{name}: audio is longer than {max_seconds:g} s")


def _collect(blocks: Iterator[np.ndarray], rate: int, channels: int, name: str,
             max_seconds: float | None) -> np.ndarray:
    """Decoded [frames, channels] blocks -> mono samples at ``rate``, checked before and while reading."""
    _check_rate(rate, name)
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{name}: {channels} channels is not plausible audio")
    mono, frames = [], 0
    for block in blocks:
        with np.errstate(over="ignore", invalid="ignore"):  # huge float samples overflow: the finite check says so
            mono.append(block.mean(axis=1, dtype=np.float32))  # exact for one channel
        frames += len(block)
        _check_length(frames, rate, max_seconds, name)
    return np.concatenate(mono) if mono else np.empty(0, np.float32)


def _sf_blocks(f) -> Iterator[np.ndarray]:
    # Read until libsndfile returns nothing: a header's frame count may be absurd either way.
    while len(block := f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
        yield block


def _decode(data, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        with sf.SoundFile(data) as f:
            return _collect(_sf_blocks(f), f.samplerate, f.channels, name, max_seconds), f.samplerate
    except AudioError:
        raise  # libsndfile read it fine; the audio itself is unacceptable
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        # soundfile names the input by its repr ("Error opening <_io.BytesIO object at 0x...>"): the message
        # names it already, so drop that
        reason = str(e).replace(f"Error opening {data!r}: ", "").replace(repr(data), "the input")
    # libsndfile has no M4A/AAC or WebM; FFmpeg (through PyAV, optional) has. Its error is only a second
    # opinion, so the message keeps libsndfile's reason.
    decoded = _decode_av(data, name, max_seconds)
    if decoded is None:
        hint = "" if _has_av() else "; m4a, mp4, aac and webm need PyAV (pip install av)"
        raise AudioError(f"{name}: cannot decode audio ({reason}{hint})") from None
    return decoded


def _has_av() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _decode_av(data, name: str, max_seconds: float | None) -> tuple[np.ndarray, int] | None:
    """Decode with FFmpeg via PyAV: mono float32 and the rate; None if PyAV is missing, finds no audio stream,
    fails, or decodes nothing."""
    try:
        import av
    except ImportError:
        return None
    if hasattr(data, "seek"):
        data.seek(0)
    try:
        with av.open(data) as container:
            if not container.streams.audio or container.streams.audio[0].codec_context is None:
                return None
            # Packed float32, keeping each frame's layout and rate: downmix and resampling stay ours. Not planar
            # ("fltp"): PyAV 18 counts 9 planes in an 8-channel planar frame and to_ndarray() reads past them
            # (a segfault: a 920-byte upload took the server down).
            to_float = av.AudioResampler(format="flt")
            frames = (f for frame in itertools.chain(container.decode(audio=0), [None])  # None: flush
                      for f in to_float.resample(frame))
            first = next(frames, None)  # the rate and layout decoded, not the header's (HE-AAC doubles the rate)
            if first is None:
                return None
            rate = first.sample_rate
            blocks = (f.to_ndarray().reshape(-1, f.layout.nb_channels)  # [1, samples * channels] interleaved
                      for f in itertools.chain([first], frames))
            return _collect(blocks, rate, first.layout.nb_channels, name, max_seconds), rate
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, OSError):
        return None


def load_audio(source: AudioInput, sample_rate: int | None = None, max_seconds: float | None = None,
               name: str | None = None) -> np.ndarray:
    """Any supported input -> float32 mono samples at 16 kHz, shape [N], N > 0, all finite.

    ``sample_rate`` is the rate of an in-memory array or tensor; encoded files and bytes carry their own.
    ``max_seconds``: longer input raises AudioTooLong, and encoded input is decoded no further than that.
    ``name``: what error messages call the input (e.g. an upload's file name); default: the path, or its kind.
    """
    name = name or describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise AudioError(f"{name}: is a directory, not an audio file")
        if not path.is_file():
            raise AudioError(f"{name}: no such file")
        samples, rate = _decode(str(path), name, max_seconds)
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(f"{name}: empty upload")
        samples, rate = _decode(io.BytesIO(bytes(source)), name, max_seconds)
    else:
        if sample_rate is None:
            raise AudioError(f"{name}: in-memory audio needs its sample_rate")
        if hasattr(source, "detach"):  # torch.Tensor, without importing torch here
            source = source.detach().cpu().float().numpy()
        samples, rate = _to_mono(_to_float(np.asarray(source), name), name), sample_rate
        _check_rate(rate, name)
        _check_length(len(samples), rate, max_seconds, name)
    if samples.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    out = resample(samples, int(rate))
    if out.size == 0:  # soxr gives nothing for a couple of samples at a higher rate
        raise AudioError(f"{name}: audio is too short ({samples.size} samples at {rate} Hz)")
    if not np.isfinite(out).all():  # finite but huge samples (float files hold up to 3e38) overflow soxr
        raise AudioError(f"{name}: sample values too large: resampling overflows float32")
    return np.ascontiguousarray(out)


# ---- native decoder chatter ----------------------------------------------------------------------------------

# What libmpg123 (inside libsndfile) and FFmpeg print per damaged frame, straight to file descriptor 2: a long
# MP3 with a few bad frames puts hundreds of these lines into a server log.
DECODER_CHATTER = re.compile(r"^(Note: |Warning: |\[src/libmpg123/|\[[\w ,.-]+ @ 0x[0-9a-f]+\] )")


def quiet_decoder_logs(interval_s: float = 60.0):
    """Route what native code writes to file descriptor 2 through a filter: decoder chatter (DECODER_CHATTER)
    is counted and reported through ``logging`` (the first line, then how many more, at most once per
    ``interval_s``); every other line passes unchanged. Python's own ``sys.stderr`` (logging included) is moved
    to a copy of the real descriptor, so it is not delayed. Returns a function that undoes this and reports
    the last count. For processes (``serve``, the CLI), not libraries: it takes over the process's fd 2."""
    import logging
    import sys
    import threading
    import time

    log = logging.getLogger(__name__)
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    old = sys.stderr
    try:
        on_fd2 = old.fileno() == 2
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation) e.g. captured by pytest
        on_fd2 = False
    handlers = []
    if on_fd2:
        sys.stderr = open(real, "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                          errors="backslashreplace", closefd=False)
        handlers = [h for h in logging.root.handlers if isinstance(h, logging.StreamHandler) and h.stream is old]
        for h in handlers:
            h.setStream(sys.stderr)
    state = {"first": None, "pending": 0, "total": 0, "at": time.monotonic()}

    def report(final: bool = False) -> None:
        if state["pending"] and (final or time.monotonic() - state["at"] >= interval_s):
            log.warning("audio decoders reported %d more damaged-frame messages (not shown)", state["pending"])
            state["pending"], state["at"] = 0, time.monotonic()

    def pump() -> None:
        with open(read_end, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if not DECODER_CHATTER.match(line):
                    os.write(real, raw)
                    continue
                state["total"] += 1
                if state["first"] is None:
                    state["first"] = line
                    log.warning("audio decoder: %s (further decoder messages are counted, not shown)", line)
                else:
                    state["pending"] += 1
                    report()

    thread = threading.Thread(target=pump, name="decoder-chatter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        thread.join(5)
        report(final=True)
        for h in handlers:
            h.setStream(old)
        if on_fd2:
            sys.stderr.flush()
            sys.stderr = old
        os.close(real)

    return restore
