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
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .audio import TARGET_RATE, AudioInput, load_audio

log = logging.getLogger(__name__)

__all__ = ["InOrder", "LongTranscription", "Segment", "VadSettings", "add_arguments", "cut_points", "plan_segments",
           "speech_scores", "to_json", "to_srt", "to_vtt", "transcribe_long"]

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms): the frame silero-vad was trained on
SILERO_CONTEXT = 64  # samples of the previous frame that silero's ONNX model sees before each frame
SILERO_FILE = "silero_vad_16k_sequence.onnx"  # the variant that takes many frames per call (silero-vad >= 6.2)
SILERO_BLOCK = 4096  # frames per ONNX call (~2 min): bounds memory on hour-long audio
ON, OFF = 0.5, 0.35  # open / close thresholds of a speech span (silero's defaults: 0.5 and 0.5 - 0.15)
MIN_SPEECH_S = 0.1  # shorter blips are not speech (a click); short words like "yes" are ~0.3 s
ENERGY_RANGE_DB = 35.0  # energy VAD: frames within this of the recording's loud level are speech
SILENCE_DBFS = -70.0  # energy VAD: below this a frame is silence whatever the recording's level
VADS = ("auto", "silero", "energy", "none")
LONG_FORMATS = ("json", "srt", "vtt")  # timestamped formats: always long-form


@dataclass(frozen=True)
class VadSettings:
    """How speech spans are found (OpenAI's ``server_vad`` chunking strategy maps onto these)."""

    threshold: float = ON  # a frame scoring >= this opens a speech span; < threshold - 0.15 closes it
    pad_s: float = 0.3  # kept around each span (OpenAI's prefix_padding_ms)
    min_silence_s: float = 0.0  # pauses shorter than this do not end a span (OpenAI's silence_duration_ms)

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1], got {self.threshold}")
        if self.pad_s < 0 or self.min_silence_s < 0:
            raise ValueError("VAD padding and silence duration must be >= 0")


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio: the first sample sent to the model
    end: float  # seconds: one past the last sample sent (segments never overlap)
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", or "length" when max_new_tokens cut the segment short
    # 1 - the VAD's highest speech score over any MIN_SPEECH_S stretch of the segment (see no_speech_prob)
    no_speech_prob: float | None = None
    logprobs: list[float] | None = None  # of each token_ids entry, when the decoder gives them


@dataclass(frozen=True)
class LongTranscription:
    text: str  # segment texts joined with single spaces, in order
    segments: list[Segment]
    duration: float  # seconds of audio
    vad: str  # the voice-activity detector that placed the cuts: silero | energy | none
    words: list[dict] | None = None  # [{word, start, end}] in seconds, from a model with word timestamps

    def as_dict(self) -> dict:
        """Timestamped JSON body: text, segments (id, start, end, text, token_ids, finish_reason, no_speech_prob,
        and avg_logprob when the decoder gives log-probabilities), duration, vad, and words when there are."""
        body = asdict(self)
        if body["words"] is None:
            del body["words"]
        segments = []
        for i, s in enumerate(body["segments"]):
            logprobs = s.pop("logprobs")
            if logprobs is not None:
                s["avg_logprob"] = avg_logprob(logprobs)
            segments.append({"id": i, **s})
        body["segments"] = segments
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


def _frames(seconds: float) -> int:
    return round(seconds * TARGET_RATE / FRAME)


def _spans(score: np.ndarray, settings: VadSettings) -> list[list[int]]:
    """Padded, merged speech spans as [first frame, end frame) pairs."""
    spans, start, speaking = [], 0, False
    on, off = settings.threshold, max(settings.threshold - (ON - OFF), 0.0)
    min_frames = max(1, _frames(MIN_SPEECH_S))
    for i, s in enumerate(np.append(score, 0.0)):  # a trailing 0 closes a span open at the end
        if not speaking and s >= on:
            start, speaking = i, True
        elif speaking and s < off:
            speaking = False
            if i - start >= min_frames:
                spans.append([start, i])
    merged: list[list[int]] = []
    pad, gap = _frames(settings.pad_s), _frames(settings.min_silence_s)
    for a, b in spans:
        a, b = max(0, a - pad), min(len(score), b + pad)
        if merged and a <= merged[-1][1] + gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return merged


def plan_segments(wave: np.ndarray, max_segment_s: float = 40.0, vad: str = "auto", pad_s: float = 0.3,
                  settings: VadSettings | None = None) -> tuple[list[tuple[int, int]], str]:
    """Where to cut 16 kHz mono audio: ([(first sample, end sample), ...] in order, each at most
    ``max_segment_s`` long and never overlapping, detector name). Empty when no speech is found.
    ``settings`` (threshold, padding, minimum pause) replaces ``pad_s`` when given."""
    score, name = speech_scores(wave, vad)
    return cut_points(score, len(wave), max_segment_s, settings or VadSettings(pad_s=pad_s)), name


def cut_points(score: np.ndarray, n_samples: int, max_segment_s: float, settings: VadSettings = VadSettings(),
               group: bool = True) -> list[tuple[int, int]]:
    """``plan_segments`` from speech scores already computed (``speech_scores``). ``group=False``: every
    speech span is a segment of its own (a chunking_strategy's cuts) instead of spans grouped up to the
    maximum (the model does best with long context)."""
    if max_segment_s < 1.0:
        raise ValueError(f"max_segment_s must be >= 1 s, got {max_segment_s}")
    limit = int(max_segment_s * TARGET_RATE) // FRAME  # frames: whole frames keep every segment within the limit
    spans = []
    for a, b in _spans(score, settings):
        while b - a > limit:  # speech with no pause: cut at the least speech-like frame in the second half
            lo, hi = a + limit // 2, a + limit
            window = score[lo:hi + 1]
            cut = lo + len(window) - 1 - int(np.argmin(window[::-1]))  # the latest of equal minima
            log.info("no pause in %.1f s of speech: cut at %.2f s", (b - a) * FRAME / TARGET_RATE,
                     cut * FRAME / TARGET_RATE)
            spans.append([a, cut])
            a = cut
        spans.append([a, b])
    if not group:
        return [(a * FRAME, min(b * FRAME, n_samples)) for a, b in spans]
    cuts, i = [], 0
    while i < len(spans):
        start, j = spans[i][0], i
        while j + 1 < len(spans) and spans[j + 1][1] - start <= limit:
            j += 1
        k = j
        if j + 1 < len(spans):  # more follows: end at the widest pause, preferring segments >= half the limit
            k = max(range(i, j + 1), key=lambda m: (spans[m][1] - start >= limit // 2,
                                                    spans[m + 1][0] - spans[m][1], m))
        cuts.append((start * FRAME, min(spans[k][1] * FRAME, n_samples)))
        i = k + 1
    return cuts


def no_speech_prob(score: np.ndarray, a: int, b: int) -> float:
    """For samples [a, b): 1 - the highest mean speech score of any MIN_SPEECH_S stretch (~3 frames) in it, so
    one loud click does not count as speech but a short word does. With silero this is 1 - a speech
    probability; with the energy detector a level score (0.5 at ENERGY_RANGE_DB below the recording's loud
    level), with vad "none" always 0."""
    s = score[a // FRAME : max(-(-b // FRAME), a // FRAME + 1)]
    if len(s) == 0:
        return 1.0
    k = min(len(s), max(1, _frames(MIN_SPEECH_S)))
    means = np.convolve(s, np.full(k, 1.0 / k), mode="valid")
    return round(float(1.0 - means.max()), 4)


def avg_logprob(logprobs: list[float]) -> float:
    """Mean log-probability of a segment's tokens (0 for no tokens: the empty sequence is certain)."""
    return round(float(np.mean(logprobs)), 6) if logprobs else 0.0


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: UTF-8 bytes of the text / bytes once zlib-compressed (0 for no text)."""
    import zlib

    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


# ---- transcription ----------------------------------------------------------------------------------------------

class InOrder:
    """Items through a running Engine with at most ``window`` of them in it at once (the next is submitted as
    one finishes), results delivered in input order as soon as an item and all earlier ones are done.

    The window is what keeps admission fair: a long-form request's segments can hold at most ``window`` places
    in the engine's FIFO queue and batch, so a short request that arrives meanwhile waits behind at most that
    many segments, not behind the whole file.

    ``submit(item, on_delta) -> handle`` queues one item (``Engine.submit``); ``on_item(i, result)`` gets each
    result in order, a Transcription or the exception that item raised; ``on_done()`` is called once, when
    nothing of this run is left in the engine (all delivered, or cancelled and confirmed by the engine).
    ``call(fn, *args)`` runs the run's bookkeeping when the engine thread reports a finished item: by default in
    that thread; the server passes ``loop.call_soon_threadsafe``, the CLI a queue its main thread drains. A
    full engine queue (QueueFull) defers the next submission until one of this run's items finishes; with
    none in the engine it is that item's result. ``cancel()`` cancels what is in the engine and submits no
    more. ``on_end(i, result)`` hears of every item that leaves the engine, cancelled ones included."""

    def __init__(self, submit, items: list, window: int, on_item, on_done=None, call=None, on_end=None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._submit, self.items, self.window = submit, items, window
        self._on_item, self._on_done, self._on_end = on_item, on_done, on_end
        self._call = call or (lambda fn, *a: fn(*a))
        self._lock = threading.RLock()
        self._handles: dict = {}  # item index -> handle, while in the engine
        self._results: dict = {}  # item index -> result, until delivered
        self._next_submit = self._next_deliver = 0
        self.cancelled = self.done = False

    @property
    def waiting(self) -> int:
        """Items not yet submitted (0 once cancelled: they never will be)."""
        return 0 if self.cancelled else len(self.items) - self._next_submit

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def start(self) -> "InOrder":
        with self._lock:
            self._fill()
        return self

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for h in self._handles.values():
                h.cancel()
            self._check_done()

    def _fill(self) -> None:
        from .engine import QueueFull

        while not self.cancelled and self._next_submit < len(self.items) and len(self._handles) < self.window:
            i = self._next_submit
            try:
                self._handles[i] = self._submit(self.items[i], lambda d, i=i: d is None and self._ended_soon(i))
            except QueueFull as e:
                if self._handles:
                    break  # retried when one of ours finishes
                self._results[i] = e
            except Exception as e:
                self._results[i] = e
            self._next_submit += 1
        self._deliver()

    def _ended_soon(self, i: int) -> None:  # engine thread
        try:
            self._call(self._ended, i)
        except RuntimeError:  # the caller's loop is gone: nobody is waiting for this run any more
            pass

    def _ended(self, i: int) -> None:
        with self._lock:
            h = self._handles.pop(i)
            try:
                self._results[i] = h.result(0)
            except Exception as e:
                self._results[i] = e
            if self._on_end is not None:  # every item that was in the engine, cancelled ones included
                self._on_end(i, self._results[i])
            self._fill()

    def _deliver(self) -> None:
        while self._next_deliver in self._results:
            i = self._next_deliver
            r = self._results.pop(i)
            self._next_deliver += 1
            if not self.cancelled:
                self._on_item(i, r)
        self._check_done()

    def _check_done(self) -> None:
        if not self.done and not self._handles and (self.cancelled or self._next_deliver == len(self.items)):
            self.done = True
            if self._on_done is not None:
                self._on_done()


def segments_from(cuts: list[tuple[int, int]], results: list, score: np.ndarray | None) -> list[Segment]:
    """Segments from the cut points and their transcriptions (warning about those cut short)."""
    segments = []
    for (a, b), r in zip(cuts, results):
        if r.finish_reason == "length":
            log.warning("segment %.2f-%.2f s reached max_new_tokens: its text is cut short", a / TARGET_RATE,
                        b / TARGET_RATE)
        logprobs = getattr(r, "logprobs", None)
        segments.append(Segment(a / TARGET_RATE, b / TARGET_RATE, r.text, list(r.token_ids), r.finish_reason,
                                None if score is None else no_speech_prob(score, a, b),
                                None if logprobs is None else list(logprobs)))
    return segments


def model_timestamps(cuts: list[tuple[int, int]], results: list,
                     score: np.ndarray | None) -> tuple[list[Segment], list[dict]]:
    """Segments and words from a model that gives its own timestamps (Parakeet-TDT: each Transcription's
    ``extra["segments"]``, ``["words"]`` and ``["tokens"]``, in seconds from the start of its piece): the model's
    sentence segments and its words, offset by each piece's start (``cuts``, samples) into the whole audio, in
    seconds rounded to the millisecond. Each token belongs to the last segment starting at or before it."""
    segments, words = [], []
    for (a, _), r in zip(cuts, results):
        shift = a / TARGET_RATE
        words += [{"word": w["word"], "start": round(w["start"] + shift, 3), "end": round(w["end"] + shift, 3)}
                  for w in r.extra["words"]]
        starts = [s["start_offset"] for s in r.extra["segments"]]  # encoder frames within the piece
        owner = [max([k for k, s0 in enumerate(starts) if s0 <= t["start_offset"]], default=0)
                 for t in r.extra["tokens"]]
        for k, s in enumerate(r.extra["segments"]):
            start, end = round(s["start"] + shift, 3), round(s["end"] + shift, 3)
            ids = [t["token_id"] for t, o in zip(r.extra["tokens"], owner) if o == k]
            no_speech = None if score is None else no_speech_prob(score, round(start * TARGET_RATE),
                                                                  round(end * TARGET_RATE))
            segments.append(Segment(start, end, s["segment"], ids, r.finish_reason, no_speech))
    return segments, words


def join_texts(texts) -> str:
    return " ".join(t for t in texts if t)


def _transcribe_pieces(asr, pieces: list[np.ndarray], max_new_tokens: int | None,
                       progress: Callable[[int], None] | None, window: int | None) -> list:
    """The engine takes the pieces as ordinary requests, at most ``window`` at once (default: its max_queue);
    a CanaryQwen is its engine. Raises the first failure, after cancelling the rest."""
    asr = getattr(asr, "engine", asr)
    results: list = []
    finished = threading.Event()
    failure: list[BaseException] = []

    def on_item(i, r):
        if isinstance(r, BaseException):
            failure.append(r)
            run.cancel()
            return
        results.append(r)
        if progress is not None:
            progress(1)

    run = InOrder(lambda p, cb: asr.submit(p, sample_rate=TARGET_RATE, max_new_tokens=max_new_tokens, on_delta=cb),
                  pieces, window or asr.options.max_queue, on_item, finished.set)
    try:
        run.start()
        finished.wait()
    finally:
        if not run.done:  # interrupted (KeyboardInterrupt): leave nothing running in the engine
            run.cancel()
    if failure:
        raise failure[0]
    return results


def transcribe_long(asr, audio: AudioInput, sample_rate: int | None = None, max_segment_s: float = 40.0,
                    vad: str = "auto", pad_s: float = 0.3, max_new_tokens: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    on_plan: Callable[[int], None] | None = None, settings: VadSettings | None = None,
                    window: int | None = None, group: bool = True) -> LongTranscription:
    """Transcribe audio of any length with ``asr``: a running ``runtime.Engine`` (segments go in as ordinary
    requests, at most ``window`` at once) or a ``runtime.CanaryQwen`` (its engine). ``progress(n)``: n more segments done;
    ``on_plan(n)``: the number of segments, once known. Raises what the segments' requests raise."""
    wave = load_audio(audio, sample_rate)
    score, name = speech_scores(wave, vad)
    cuts = cut_points(score, len(wave), max_segment_s, settings or VadSettings(pad_s=pad_s), group)
    if on_plan is not None:
        on_plan(len(cuts))
    results = _transcribe_pieces(asr, [wave[a:b] for a, b in cuts], max_new_tokens, progress, window)
    segments = segments_from(cuts, results, score)
    return LongTranscription(join_texts(s.text for s in segments), segments, len(wave) / TARGET_RATE, name)


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
