"""Long-form audio: any length transcribed completely, in pause-aligned segments with timestamps.

Canary-Qwen was trained on at most 40 s (and 1024 tokens); longer input degrades. So long audio is cut into
segments of at most ``max_segment_s`` seconds whose cut points lie in pauses, the segments are transcribed as
ordinary requests (the engine batches them like any others), and the texts are joined with spaces in order,
as the model's own demo joins its fixed 40 s windows.

How the cuts are chosen (frames of 512 samples = 32 ms at 16 kHz, silero's frame size):
1. A speech score per frame: silero-vad's ONNX model (shipped inside the ``silero-vad`` wheel, run with
   onnxruntime alone: importing the ``silero_vad`` package would import torch and set its thread count), or an
   energy score when that is unavailable, or 1 everywhere (``vad="none"``: plain fixed windows).
2. Speech spans: score >= 0.5 opens a span, < 0.35 closes it (silero's own threshold and hysteresis); spans
   shorter than ``MIN_SPEECH_S`` are dropped; each span is padded by ``pad_s`` on both sides and spans that
   then touch are merged. Audio outside every padded span is not transcribed.
3. A span longer than the maximum (speech without a pause) is cut at its lowest-scoring frame in the second
   half of the window, so no piece is shorter than half the maximum; this is logged.
4. Consecutive spans are grouped into segments of at most the maximum; a segment ends at the widest pause
   whose cut keeps the segment at least half the maximum long (the widest of all if none does).

Facts relied on, from silero-vad 6.2.3 (read, not copied): ``sequence_vad.py`` (the sequence model's rows are
64 samples of context + a 512-sample frame; LSTM state ``h``, ``c`` of shape [1, 1, 128]) and ``utils_vad.py``
(threshold 0.5, end of speech below threshold - 0.15).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .audio import TARGET_RATE, AudioInput, load_audio

log = logging.getLogger(__name__)

__all__ = ["LongTranscription", "Segment", "add_arguments", "plan_segments", "run", "speech_scores",
           "to_json", "to_srt", "to_vtt", "transcribe_long"]

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms): the frame silero-vad was trained on
SILERO_CONTEXT = 64  # samples of the previous frame that silero's ONNX model sees before each frame
SILERO_FILE = "silero_vad_16k_sequence.onnx"  # the variant that takes many frames per call (silero-vad >= 6.2)
SILERO_BLOCK = 4096  # frames per ONNX call (~2 min): bounds memory on hour-long audio
ON, OFF = 0.5, 0.35  # open / close thresholds of a speech span (silero's defaults: 0.5 and 0.5 - 0.15)
MIN_SPEECH_S = 0.1  # shorter blips are not speech (a click); short words like "yes" are ~0.3 s
ENERGY_RANGE_DB = 35.0  # energy VAD: frames within this of the recording's loud level are speech
SILENCE_DBFS = -70.0  # energy VAD: below this a frame is silence whatever the recording's level
VADS = ("auto", "silero", "energy", "none")
OUTPUT_FORMATS = ("text", "jsonl", "json", "srt", "vtt")  # what `run` writes (the choices of --output-format)


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio: the first sample sent to the model
    end: float  # seconds: one past the last sample sent (segments never overlap)
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", or "length" when max_new_tokens cut the segment short


@dataclass(frozen=True)
class LongTranscription:
    text: str  # segment texts joined with single spaces, in order
    segments: list[Segment]
    duration: float  # seconds of audio
    vad: str  # the voice-activity detector that placed the cuts: silero | energy | none

    def as_dict(self) -> dict:
        """Timestamped JSON body: text, segments (id, start, end, text, token_ids, finish_reason), duration, vad."""
        body = asdict(self)
        body["segments"] = [{"id": i, **s} for i, s in enumerate(body["segments"])]
        return body


# ---- where to cut ---------------------------------------------------------------------------------------------

def _silero_path() -> Path | None:
    """The ONNX file inside the installed silero-vad wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SILERO_FILE
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _silero_session():
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # a small LSTM: threads cost more than they give
    return onnxruntime.InferenceSession(str(_silero_path()), opts, providers=["CPUExecutionProvider"])


def silero_available() -> bool:
    return _silero_path() is not None and importlib.util.find_spec("onnxruntime") is not None


def _silero_scores(wave: np.ndarray) -> np.ndarray:
    """Speech probability per frame. The model is an LSTM over frames; each input row is the frame preceded by
    the last 64 samples of the previous frame (zeros before the first), and the state carries across calls."""
    n = -(-len(wave) // FRAME)
    frames = np.zeros((n, FRAME), np.float32)  # [frames, 512], the last one zero-padded
    frames.reshape(-1)[: len(wave)] = wave
    context = np.zeros((n, SILERO_CONTEXT), np.float32)
    context[1:] = frames[:-1, -SILERO_CONTEXT:]
    rows = np.concatenate([context, frames], axis=1)  # [frames, 576]
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    session = _silero_session()
    out = []
    for i in range(0, n, SILERO_BLOCK):
        probs, h, c = session.run(["speech_probs", "hn", "cn"], {"input": rows[i : i + SILERO_BLOCK], "h": h, "c": c})
        out.append(probs)
    return np.concatenate(out).astype(np.float32)


def _energy_scores(wave: np.ndarray) -> np.ndarray:
    """A score per frame from its level relative to the recording's loud frames (95th percentile): 0.5 at
    ENERGY_RANGE_DB below it, 0 and 1 twenty dB below and above that. Relative, so it works at any recording
    gain; it finds pauses only where they are that much quieter than speech."""
    n = -(-len(wave) // FRAME)
    frames = np.zeros((n, FRAME), np.float32)
    frames.reshape(-1)[: len(wave)] = wave
    db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.percentile(db, 95)
    score = np.clip((db - (loud - ENERGY_RANGE_DB)) / 40 + 0.5, 0, 1)
    score[db < SILENCE_DBFS] = 0
    return score.astype(np.float32)


def speech_scores(wave: np.ndarray, vad: str = "auto") -> tuple[np.ndarray, str]:
    """(score in [0, 1] per 512-sample frame, name of the detector used) for 16 kHz mono audio."""
    if vad not in VADS:
        raise ValueError(f"unknown vad {vad!r} (choose from {', '.join(VADS)})")
    if vad in ("auto", "silero"):
        if silero_available():
            return _silero_scores(wave), "silero"
        if vad == "silero":
            raise RuntimeError("vad='silero' needs the silero-vad and onnxruntime packages "
                               "(pip install 'canary-trt[longform]')")
        log.warning("silero-vad or onnxruntime not installed: cutting at quiet places found by energy")
    if vad == "none":
        return np.ones(-(-len(wave) // FRAME), np.float32), "none"
    return _energy_scores(wave), "energy"


def _spans(score: np.ndarray, pad: int) -> list[list[int]]:
    """Padded, merged speech spans as [first frame, end frame) pairs."""
    spans, start, speaking = [], 0, False
    min_frames = max(1, round(MIN_SPEECH_S * TARGET_RATE / FRAME))
    for i, s in enumerate(np.append(score, 0.0)):  # a trailing 0 closes a span open at the end
        if not speaking and s >= ON:
            start, speaking = i, True
        elif speaking and s < OFF:
            speaking = False
            if i - start >= min_frames:
                spans.append([start, i])
    merged: list[list[int]] = []
    for a, b in spans:
        a, b = max(0, a - pad), min(len(score), b + pad)
        if merged and a <= merged[-1][1]:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return merged


def plan_segments(wave: np.ndarray, max_segment_s: float = 40.0, vad: str = "auto",
                  pad_s: float = 0.3) -> tuple[list[tuple[int, int]], str]:
    """Where to cut 16 kHz mono audio: ([(first sample, end sample), ...] in order, each at most
    ``max_segment_s`` long and never overlapping, detector name). Empty when no speech is found."""
    if max_segment_s < 1.0:
        raise ValueError(f"max_segment_s must be >= 1 s, got {max_segment_s}")
    score, name = speech_scores(wave, vad)
    limit = int(max_segment_s * TARGET_RATE) // FRAME  # frames: whole frames keep every segment within the limit
    spans = []
    for a, b in _spans(score, round(pad_s * TARGET_RATE / FRAME)):
        while b - a > limit:  # speech with no pause: cut at the least speech-like frame in the second half
            lo, hi = a + limit // 2, a + limit
            window = score[lo:hi + 1]
            cut = lo + len(window) - 1 - int(np.argmin(window[::-1]))  # the latest of equal minima
            log.info("no pause in %.1f s of speech: cut at %.2f s", (b - a) * FRAME / TARGET_RATE,
                     cut * FRAME / TARGET_RATE)
            spans.append([a, cut])
            a = cut
        spans.append([a, b])
    cuts, i = [], 0
    while i < len(spans):
        start, j = spans[i][0], i
        while j + 1 < len(spans) and spans[j + 1][1] - start <= limit:
            j += 1
        k = j
        if j + 1 < len(spans):  # more follows: end at the widest pause, preferring segments >= half the limit
            k = max(range(i, j + 1), key=lambda m: (spans[m][1] - start >= limit // 2,
                                                    spans[m + 1][0] - spans[m][1], m))
        cuts.append((start * FRAME, min(spans[k][1] * FRAME, len(wave))))
        i = k + 1
    return cuts, name


# ---- transcription ----------------------------------------------------------------------------------------------

def _transcribe_pieces(asr, pieces: list[np.ndarray], max_new_tokens: int | None,
                       progress: Callable[[int], None] | None) -> list:
    """An Engine takes the pieces as ordinary requests (``Engine.map``: in order, waiting when its queue is
    full); a CanaryQwen (no ``submit``) runs them in its sorted static batches. Raises the first failure."""
    if not hasattr(asr, "submit"):
        from .options import DEFAULT_MAX_NEW_TOKENS

        return asr.transcribe_samples(pieces, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                      progress=progress)
    results = []
    for _, r in asr.map(pieces, sample_rate=TARGET_RATE, max_new_tokens=max_new_tokens):
        results.append(r)
        if progress is not None:
            progress(1)
    error = next((r for r in results if isinstance(r, Exception)), None)
    if error is not None:
        raise error
    return results


def transcribe_long(asr, audio: AudioInput, sample_rate: int | None = None, max_segment_s: float = 40.0,
                    vad: str = "auto", pad_s: float = 0.3, max_new_tokens: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    on_plan: Callable[[int], None] | None = None) -> LongTranscription:
    """Transcribe audio of any length with ``asr``: a running ``runtime.Engine`` (segments go in as ordinary
    requests) or a ``runtime.CanaryQwen``. ``progress(n)``: n more segments done; ``on_plan(n)``: the number
    of segments, once known. Raises what the segments' requests raise."""
    wave = load_audio(audio, sample_rate)
    cuts, name = plan_segments(wave, max_segment_s, vad, pad_s)
    if on_plan is not None:
        on_plan(len(cuts))
    results = _transcribe_pieces(asr, [wave[a:b] for a, b in cuts], max_new_tokens, progress)
    segments = []
    for (a, b), r in zip(cuts, results):
        if r.finish_reason == "length":
            log.warning("segment %.2f-%.2f s reached max_new_tokens: its text is cut short", a / TARGET_RATE,
                        b / TARGET_RATE)
        segments.append(Segment(a / TARGET_RATE, b / TARGET_RATE, r.text, list(r.token_ids), r.finish_reason))
    text = " ".join(s.text for s in segments if s.text)
    return LongTranscription(text, segments, len(wave) / TARGET_RATE, name)


# ---- output formats ---------------------------------------------------------------------------------------------

def timestamp(seconds: float, sep: str) -> str:
    """HH:MM:SS<sep>mmm (SRT uses ',', WebVTT '.')."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _cues(t: LongTranscription, sep: str, numbered: bool) -> str:
    spoken = [s for s in t.segments if s.text]  # a cue with no text is invalid in both formats
    out = []
    for n, s in enumerate(spoken, 1):
        out.append(f"{n}\n" if numbered else "")
        out.append(f"{timestamp(s.start, sep)} --> {timestamp(s.end, sep)}\n{s.text}\n\n")
    return "".join(out)


def to_srt(t: LongTranscription) -> str:
    return _cues(t, ",", numbered=True)


def to_vtt(t: LongTranscription) -> str:
    return "WEBVTT\n\n" + _cues(t, ".", numbered=False)


def to_json(t: LongTranscription) -> str:
    return json.dumps(t.as_dict(), ensure_ascii=False)


# ---- command line (wired into `canary-trt transcribe` by runtime/cli.py) -----------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Long-form options of ``canary-trt transcribe``."""
    parser.add_argument("--long-form", action="store_true",
                        help="cut long audio at pauses into segments of at most --max-segment-seconds, transcribe "
                             "all of them, output with timestamps (implied by --output-format json|srt|vtt)")
    parser.add_argument("--max-segment-seconds", type=float, default=40.0,
                        help="longest segment (default: %(default)s, the longest training audio)")
    parser.add_argument("--vad", choices=VADS, default="auto",
                        help="what finds the pauses: silero (extra 'longform'), energy, none (fixed windows); "
                             "auto: silero when installed, else energy")


def run(args: argparse.Namespace) -> int:
    """``canary-trt transcribe --long-form``: the arguments of ``transcribe`` (``cli.add_engine_arguments``, files,
    output_format, no_progress) plus ``add_arguments``'; ``args.output_format``: text | jsonl | json | srt | vtt.
    One file: the output on stdout; several: text and jsonl as ``transcribe`` prints them, json/srt/vtt each
    written next to its audio (FILE.srt, ...)."""
    from .audio import AudioError
    from .options import engine_kwargs
    from .engine import Engine

    fmt = args.output_format
    try:
        kwargs = engine_kwargs(args)
        # room for the longest segment: 12.5 audio frames per second, the prompt's text and the new tokens
        kwargs["max_seq_len"] = max(kwargs["max_seq_len"], int(args.max_segment_seconds * 12.5) + 64 +
                                    kwargs["max_new_tokens"])
        engine = Engine.from_pretrained(**kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    failed = 0
    try:
        for f in args.files:
            bar = None
            if not getattr(args, "no_progress", False):
                from tqdm import tqdm

                bar = tqdm(unit="segment", desc=os.path.basename(f), file=sys.stderr, leave=False)
            try:
                t = transcribe_long(engine, f, max_segment_s=args.max_segment_seconds, vad=args.vad,
                                    progress=None if bar is None else bar.update,
                                    on_plan=None if bar is None else (lambda n, bar=bar: setattr(bar, "total", n)))
            except (AudioError, ValueError, RuntimeError) as e:
                failed += 1
                print(f"error: {f}: {e}", file=sys.stderr)
                if fmt == "jsonl":
                    print(json.dumps({"audio": f, "error": str(e)}, ensure_ascii=False))
                continue
            finally:
                if bar is not None:  # (a tqdm has no truth value before its total is known)
                    bar.close()
            if fmt in ("text", "jsonl"):
                if fmt == "jsonl":
                    print(json.dumps({"audio": f, **t.as_dict()}, ensure_ascii=False))
                else:
                    print(t.text if len(args.files) == 1 else f"{f}\t{t.text}")
                continue
            body = {"json": to_json, "srt": to_srt, "vtt": to_vtt}[fmt](t)
            if len(args.files) == 1:
                sys.stdout.write(body if fmt != "json" else body + "\n")
            else:
                out = Path(f).with_suffix("." + fmt)
                out.write_text(body if fmt != "json" else body + "\n", encoding="utf-8")
                print(f"{f}\t{out}", file=sys.stderr)
    finally:
        engine.close()
    sys.stdout.flush()
    return 1 if failed else 0
