"""Parakeet-TDT behind the same front door as ``runtime.Engine``: submit / result / stream / cancel / map.

API (for the CLI, the server and the Triton model)::

    from runtime.parakeet import ParakeetEngine

    with ParakeetEngine.from_pretrained("nvidia/parakeet-tdt-0.6b-v2") as engine:  # or a .nemo / folder
        handle = engine.submit("a.wav")             # AudioInput: path, bytes, array (+ sample_rate), tensor
        r = handle.result()                          # runtime.common.Transcription
        r.text, r.token_ids, r.duration, r.finish_reason   # "stop" | "cancelled"
        r.extra["words"]     # [{"word", "start", "end", "start_offset", "end_offset"}]: seconds, encoder frames
        r.extra["segments"]  # [{"segment", "start", "end", "start_offset", "end_offset"}]: split at . ! ?
        r.extra["tokens"]    # per token: token_id, piece, text, start, end, start_offset, end_offset
        r.extra["timesteps"], r.extra["durations"]   # per token: encoder frame and TDT duration (frames)
        for path, result in engine.map(paths): ...   # input order; a bad input yields its exception
        async for text in engine.stream(audio): ...  # the whole text, once (TDT is not incremental)
        handle.cancel()
        long, words = engine.transcribe_long("hour.wav", max_segment_s=40.0)  # cut at pauses; LongTranscription
                                                     # + every word, timestamps offset into the whole file

Timestamps are NeMo's ``transcribe(timestamps=True)`` values (engine/tdt.py). ``submit`` decodes and
resamples in the calling thread (a bad input fails there, naming it) and raises QueueFull past ``max_queue``
waiting requests, EngineClosed once closing. A background thread takes up to ``max_batch_size`` waiting
requests (oldest first), sorts them by length, encodes them in batches of at most ``max_batch_seconds`` of
padded audio, and decodes each batch greedily on the device (engine.tdt.GreedyTDT: one host copy per step,
CUDA graphs for the step on CUDA unless ``cuda_graphs=False``). An encoder batch that fails is retried one
request at a time, so a bad request fails alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.parakeet import PARAKEET_TDT, ParakeetTDT, SentencePieceText, detect_family, load_parakeet
from engine.tdt import GreedyTDT, TdtResult, finalize

from .audio import TARGET_RATE, AudioInput, AudioTooLong, load_audio
from .common import Transcription, pad_short, pick_device, pick_dtype
from .engine import Engine, RequestHandle, _notify

log = logging.getLogger(__name__)

__all__ = ["ParakeetEngine", "ParakeetOptions", "is_parakeet"]


@dataclass(frozen=True)
class ParakeetOptions:
    max_batch_size: int = 64  # utterances encoded and decoded together
    max_queue: int = 1024  # waiting requests before submit() raises QueueFull
    max_batch_seconds: float = 1280.0  # padded audio per encoder batch (bounds activation memory)
    max_padding: float = 1.5  # an encoder batch's padded audio / its real audio at most (except one request)
    max_audio_seconds: float = 600.0  # longest single request; longer audio: transcribe_long
    cuda_graphs: bool = True  # capture the decode step (CUDA only); False: eager


@dataclass
class _Request:
    handle: RequestHandle
    audio: np.ndarray
    finished: bool = False


class ParakeetEngine:
    family = PARAKEET_TDT

    def __init__(self, model: ParakeetTDT, tokenizer: SentencePieceText, options: ParakeetOptions = ParakeetOptions(),
                 threaded: bool = True, encoder=None):
        """``encoder``: optional EncoderBackend (engine/backends/base.py) over ``ParakeetPerception``
        (engine/export/tdt_onnx.py), returning projected frames [T, joint_hidden]; default: the torch model.
        ``threaded=False``: no background thread; the caller drives ``step()``."""
        if options.max_batch_size < 1 or options.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer, self.options, self.encoder = model, tokenizer, options, encoder
        self.decoder = GreedyTDT(model, cuda_graphs=options.cuda_graphs)
        self._waiting: deque[_Request] = deque()
        self._taken: list[_Request] = []  # taken from _waiting by the step in progress
        self._inbox: list[tuple] = []
        self._queued = 0
        self._next_id = 0
        self._cv = threading.Condition()
        self._closing = False
        self.steps = 0
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="canary-trt-parakeet", daemon=True)
            self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = "nvidia/parakeet-tdt-0.6b-v2",
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        encoder: str = "torch", artifacts: str | os.PathLike | None = None,
                        **options) -> "ParakeetEngine":
        """Load a release (hub id, ``.nemo`` file or extracted folder) and start the engine. ``dtype`` is the
        encoder's (default bfloat16 on GPUs, float32 on CPUs); the prediction and joint networks are float32.
        ``encoder``: torch | onnx | tensorrt | auto, with ``artifacts`` the folder of
        ``python -m engine.export.tdt_onnx`` (checked against this checkpoint's sha256).
        ``options``: ParakeetOptions fields."""
        from engine.parakeet import locate

        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        net, tok = load_parakeet(model, dtype=dt, device=dev)
        backend = None
        if encoder != "torch":
            from engine.backends.encoder import open_encoder
            from engine.export.tdt_onnx import ParakeetPerception, checkpoint_file

            opts = ParakeetOptions(**options)
            backend = open_encoder(encoder, ParakeetPerception(net), checkpoint_file(locate(model)), artifacts, dev,
                                   dt, opts.max_batch_size)
            if backend.name == "torch":  # auto without artifacts: the model's own path is the same computation
                backend = None
        return cls(net, tok, ParakeetOptions(**options), encoder=backend)

    # ---- client side (any thread) ------------------------------------------------------------------

    def submit(self, audio: AudioInput, sample_rate: int | None = None,
               on_delta: Callable[[str | None], None] | None = None, **_ignored) -> RequestHandle:
        """Queue one utterance; returns at once. ``on_delta`` (engine thread) gets the text, then None.
        Raises AudioError (bad input, named; AudioTooLong past max_audio_seconds), QueueFull or EngineClosed.
        Canary-Qwen keywords (prompt, max_new_tokens) are accepted and ignored: TDT has neither."""
        try:
            wave = load_audio(audio, sample_rate, max_seconds=self.options.max_audio_seconds)
        except AudioTooLong as e:
            raise AudioTooLong(f"{e} (max_audio_seconds={self.options.max_audio_seconds}): use long-form "
                               f"transcription (ParakeetEngine.transcribe_long, --long-form)") from None
        duration = len(wave) / TARGET_RATE
        wave = pad_short(wave, self.model.cfg.frontend.hop_length)
        return self._enqueue(duration, on_delta, lambda h: _Request(h, wave))

    # The front door is Engine's own (it touches only the handles, the inbox, the queue bound and the thread).
    _enqueue = Engine._enqueue
    _post = Engine._post
    stream = Engine.stream
    map = Engine.map
    transcribe = Engine.transcribe
    close = Engine.close
    __enter__ = Engine.__enter__
    __exit__ = Engine.__exit__

    def transcribe_long(self, audio: AudioInput, sample_rate: int | None = None, max_segment_s: float = 40.0,
                        vad: str = "auto"):
        """Any length: cut at pauses (runtime.longform.plan_segments) into pieces of at most ``max_segment_s``,
        transcribe them as ordinary requests, and join them with the timestamps offset into the whole file.
        Returns (runtime.longform.LongTranscription whose segments are the model's own sentence segments,
        words [{"word", "start", "end"}] in seconds from the start of the file). Needs the engine thread
        (``threaded=True``)."""
        from . import longform

        wave = load_audio(audio, sample_rate)
        cuts, vad_name = longform.plan_segments(wave, max_segment_s, vad)
        window = max(1, min(2 * self.options.max_batch_size, self.options.max_queue))  # pieces in the engine at once
        # The long-form path of every engine: in order, at most `window` pieces at once, the rest cancelled if one fails.
        results = longform._transcribe_pieces(self, [wave[a:b] for a, b in cuts], None, None, window)
        segments, words = longform.model_timestamps(cuts, results, None)
        return longform.LongTranscription(longform.join_texts(s.text for s in segments), segments,
                                          len(wave) / TARGET_RATE, vad_name, words), words

    def stats(self) -> dict:
        return {"waiting": len(self._waiting), "queued": self._queued, "steps": self.steps}

    # ---- engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._waiting and not self._closing:
                    self._cv.wait()
                if self._closing and not self._inbox and not self._waiting:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the engine itself: fail what it holds, keep serving
                log.exception("parakeet engine step failed")
                for r in self._taken + list(self._waiting):
                    self._finish(r, error=e)

    def run_until_idle(self) -> None:
        while self._inbox or self._waiting:
            self.step()

    def step(self) -> None:
        """Take the inbox, then transcribe up to max_batch_size of the oldest waiting requests."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "submit":
                self._waiting.append(payload)
            elif kind == "cancel":
                r = next((r for r in self._waiting if r.handle.id == payload), None)
                if r is not None:
                    self._finish(r, cancelled=True)
        n = min(len(self._waiting), self.options.max_batch_size)
        self._taken = [self._waiting.popleft() for _ in range(n)]
        for batch in self._batches(self._taken):
            self._transcribe(batch)
        self._taken = []
        self.steps += 1

    def _batches(self, reqs: list[_Request]) -> list[list[_Request]]:
        """Length-sorted batches whose padded audio stays within max_batch_seconds and max_padding x their
        real audio (the encoder's cost is the padded size)."""
        limit = self.options.max_batch_seconds * TARGET_RATE
        out: list[list[_Request]] = []
        real = 0
        for r in sorted(reqs, key=lambda r: len(r.audio)):
            n = len(r.audio)
            padded = (len(out[-1]) + 1) * n if out else 0  # sorted: r would be the batch's longest
            if out and padded <= limit and padded <= self.options.max_padding * (real + n):
                out[-1].append(r)
                real += n
            else:
                out.append([r])
                real = n
        return out

    @torch.inference_mode()
    def _encode(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """-> (frames [B, T, D or joint_hidden], lengths [B], projected)."""
        if self.encoder is not None:
            embs = self.encoder.encode(waves)
            lens = torch.tensor([e.shape[0] for e in embs])
            return torch.nn.utils.rnn.pad_sequence([e.float() for e in embs], batch_first=True), lens, True
        dev = self.model.device
        lens = torch.tensor([len(w) for w in waves])
        x = torch.zeros(len(waves), int(lens.max()))
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
        _, _, enc, enc_lens = self.model.encode(x.to(dev), lens.to(dev))
        return enc, enc_lens, False

    def _transcribe(self, batch: list[_Request]) -> None:
        try:
            frames, lens, projected = self._encode([r.audio for r in batch])
            groups = [(batch, frames, lens)]
        except Exception:
            log.exception("encoder batch of %d failed; retrying one by one", len(batch))
            groups = []
            for r in batch:
                try:
                    frames, lens, projected = self._encode([r.audio])
                    groups.append(([r], frames, lens))
                except Exception as e:
                    self._finish(r, error=e)
        for reqs, frames, lens in groups:
            try:
                hyps = self.decoder.decode(frames, lens, projected=projected)
            except Exception as e:
                log.exception("TDT decoding of a batch of %d failed", len(reqs))
                for r in reqs:
                    self._finish(r, error=e)
                continue
            for r, hyp in zip(reqs, hyps):
                try:  # detokenisation / timestamps of one request must not fail the others
                    self._finish(r, result=finalize(hyp, self.tokenizer, self.model.cfg))
                except Exception as e:
                    log.exception("postprocessing of request %d failed", r.handle.id)
                    self._finish(r, error=e)

    def _finish(self, r: _Request, result: TdtResult | None = None, error: BaseException | None = None,
                cancelled: bool = False) -> None:
        """Resolve a request exactly once."""
        if r.finished:
            return
        r.finished = True
        if r in self._waiting:
            self._waiting.remove(r)
        with self._cv:
            self._queued -= 1
        h = r.handle
        h.finished_at = time.perf_counter()
        r.audio = np.empty(0, np.float32)
        if error is not None:
            h._error = error if isinstance(error, Exception) else RuntimeError(str(error))
        elif cancelled:
            h._result = Transcription("", [], h.duration, "cancelled")
        else:
            hyp = result.hypothesis
            extra = {"words": result.words, "segments": result.segments, "tokens": result.tokens,
                     "timesteps": hyp.timesteps, "durations": hyp.durations}
            h._result = Transcription(result.text, list(hyp.token_ids), h.duration, "stop", extra)
            h.first_token_at = h.finished_at
            if result.text:
                _notify(h, result.text)
        h._done.set()
        _notify(h, None)


# ---- command line --------------------------------------------------------------------------------------


def is_parakeet(model: str | os.PathLike) -> bool:
    """True if ``--model`` names a Parakeet-TDT release. Anything that cannot be inspected (a hub id offline,
    a typo) is left to the Canary-Qwen loader, whose errors name the problem."""
    try:
        return detect_family(model) == PARAKEET_TDT
    except Exception as e:
        log.debug("family detection of %s failed: %s", model, e)
        return False


def word_fields(words: list[dict]) -> list[dict]:
    return [{"word": w["word"], "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in words]


def segment_fields(segments: list[dict]) -> list[dict]:
    return [{"segment": s["segment"], "start": round(s["start"], 3), "end": round(s["end"], 3)} for s in segments]


def engine_from_args(args) -> ParakeetEngine:
    """A ParakeetEngine from the flags of ``canary-trt transcribe`` / ``bench`` (runtime.options)."""
    return ParakeetEngine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, cuda_graphs=not getattr(args, "no_cuda_graphs", False),
        encoder=getattr(args, "encoder", "torch") or "torch", artifacts=getattr(args, "artifacts", None))


def nemo_transcriber(model: str, device: str, batch_size: int):
    """``canary-trt bench --baseline nemo`` for Parakeet: NeMo's own ``EncDecRNNTBPEModel.transcribe`` (its
    default greedy_batch decoding) on the same .nemo (a file or hub id), ``batch_size`` files per batch, in the
    given order. ``transcribe(paths) -> [(text, token count, "stop", audio seconds)]``."""
    import soundfile as sf
    from nemo.collections.asr.models import EncDecRNNTBPEModel

    from engine.parakeet import locate

    path = locate(model)
    if path.is_dir():
        raise ValueError(f"{model}: the NeMo baseline restores a .nemo file, not an extracted folder")
    net = EncDecRNNTBPEModel.restore_from(str(path), map_location=device)
    net.eval()

    def transcribe(paths):
        hyps = net.transcribe([str(p) for p in paths], batch_size=batch_size, verbose=False)
        net.eval()  # transcribe() leaves its submodules in train mode (tests/fixtures/tdt-tiny/README.md, 3.8)
        return [(h.text, len(h.y_sequence), "stop", sf.info(p).frames / sf.info(p).samplerate)
                for h, p in zip(hyps, paths)]

    return transcribe
