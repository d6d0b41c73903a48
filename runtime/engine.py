"""In-flight batching engine: requests join and leave the running batch at every step.

One engine step = admit (encode audio + queue prefill) -> one decoder step (prefill of the admitted, one
token for every running sequence) -> postprocess (append tokens, stream text, retire finished sequences
and free their KV blocks at once). A background thread runs steps while there is work; ``submit`` may be
called from any thread, ``stream`` from any asyncio loop.

``submit`` decodes and resamples the audio in the calling thread (so a bad input fails there, naming it,
and the engine thread never waits on file I/O), then enqueues it and returns a handle at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from collections import deque
from typing import AsyncIterator, Callable, Iterable, Iterator

import numpy as np
import torch

from engine.backends.base import DecodeRequest, DecoderBackend, EncoderBackend
from engine.checkpoint import DEFAULT_MODEL, build_model, resolve
from engine.encoder import subsampled_lengths
from engine.frontend import feature_lengths
from engine.model import CanaryQwenModel
from engine.prompt import Tokenizer

from .audio import TARGET_RATE, AudioError, AudioInput, AudioTooLong, load_audio
from .common import Transcription, pad_short, pick_device, pick_dtype
from .options import EngineOptions
from .scheduler import BlockAllocator, QueueFull, Scheduler, Sequence

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineOptions", "RequestHandle", "QueueFull", "EngineClosed"]


class EngineClosed(RuntimeError):
    """The engine is closing or closed and takes no new requests."""


def _notify(handle: "RequestHandle", delta: str | None) -> None:
    """Call a request's text callback; a failing callback (e.g. a closed event loop of a client that went
    away) must not take the engine thread down."""
    if handle._on_delta is None:
        return
    try:
        handle._on_delta(delta)
    except Exception:
        log.warning("text callback of request %d failed", handle.id, exc_info=True)


class RequestHandle:
    """What ``submit`` returns: wait for the result, cancel, or watch the text arrive."""

    def __init__(self, request_id: int, engine: "Engine", duration: float,
                 on_delta: Callable[[str | None], None] | None):
        self.id, self.duration = request_id, duration
        self._engine, self._on_delta = engine, on_delta
        self._done = threading.Event()
        self._result: Transcription | None = None
        self._error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Transcription:
        """The transcription (finish_reason "stop", "length" or "cancelled"); raises the request's error if
        it failed, TimeoutError if not done within ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop generating and free the request's memory; its result keeps the text produced so far."""
        self._engine._post(("cancel", self.id))


@dataclass
class _Request:
    """Engine-thread state of one request."""

    handle: RequestHandle
    audio: np.ndarray
    prompt_ids: list[int]
    max_new_tokens: int
    prompt_len: int
    token_ids: list[int]
    sent: str = ""  # text already streamed
    finished: bool = False
    embedding: torch.Tensor | None = None  # [T_enc, H] once encoded (ahead of admission, or at it)
    logprobs: list[float] | None = None  # per token, when the decoder gives them


class Engine:
    def __init__(self, model: CanaryQwenModel, tokenizer: Tokenizer, encoder: EncoderBackend,
                 decoder: DecoderBackend | None = None, options: EngineOptions = EngineOptions(),
                 threaded: bool = True):
        """``decoder`` defaults to the torch decoder over ``model`` with a KV pool sized by ``options``.
        ``threaded=False``: no background thread; the caller drives ``step()`` (deterministic tests)."""
        from engine.backends.cuda_settings import configure

        self.model, self.tokenizer, self.encoder, self.options = model, tokenizer, encoder, options
        self.numerics = configure(model.device, model.dtype)  # TF32 off for fp32, SDPA backends: logged
        bs = options.kv_block_size
        # A decoder passed in (TensorRT-LLM) holds its own KV cache: the pool is then bookkeeping only, as big
        # as the batch could ever use, so it never holds back what the decoder can take.
        tokens = options.kv_cache_tokens or (self._default_kv_tokens() if decoder is None
                                             else options.max_batch_size * options.max_seq_len)
        num_blocks = max(-(-tokens // bs), 2) + 1  # + block 0, the decoder's scratch block
        self.allocator = BlockAllocator(num_blocks, bs)
        self.scheduler = Scheduler(self.allocator, options.max_batch_size, options.max_queue,
                                   options.max_prefill_tokens, options.refill_fraction)
        if decoder is None:
            from engine.backends.decoder_torch import TorchDecoder

            decoder = TorchDecoder(model, num_blocks, bs, options.max_batch_size, options.max_seq_len,
                                   tokenizer.eos_id, cuda_graphs=options.cuda_graphs)
        self.decoder = decoder
        self._requests: dict[int, _Request] = {}
        self._inbox: list[tuple] = []
        self._queued = 0  # submitted and not yet admitted or finished: bounded by max_queue
        self._next_id = 0
        self._cv = threading.Condition()
        self._closing = False
        self._decoder_closed = False
        self.steps = 0
        self.admit_steps = 0  # steps that admitted requests (each stalls the running streams once)
        self._encoded_bytes = 0  # embeddings held for waiting requests
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="canary-trt-engine", daemon=True)
            self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = DEFAULT_MODEL, llm: str | os.PathLike | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        merge_lora: bool = False, encoder: str = "torch", artifacts: str | None = None,
                        decoder: str = "torch", decoder_dir: str | None = None, **options) -> "Engine":
        """Load the release (hub id or folder) and start the engine.

        ``encoder``: torch | onnx | tensorrt | auto, with ``artifacts`` the folder of build/export_encoder.py;
        ``decoder``: torch | trtllm, with ``decoder_dir`` the folder of build/build_decoder.py;
        ``options``: EngineOptions fields."""
        from engine.backends.encoder import make_encoder
        from engine.checkpoint import file_sha256

        opts = EngineOptions(**options)
        if decoder not in ("torch", "trtllm"):
            raise ValueError(f"unknown decoder {decoder!r} (torch | trtllm)")
        if decoder == "trtllm" and decoder_dir is None:
            raise ValueError("decoder='trtllm' needs decoder_dir (the output of build/build_decoder.py)")
        dev = pick_device(device)
        files = resolve(model, llm)
        if decoder == "trtllm":  # TensorRT-LLM holds the LLM on the GPU itself: only the audio side goes there
            net, tok = build_model(files, dtype=pick_dtype(dtype, dev), device="cpu")
            net.llm = None
            net.perception.to(dev), net.embed_tokens.to(dev)  # embed_tokens: where model.device/dtype come from
        else:
            net, tok = build_model(files, dtype=pick_dtype(dtype, dev), device=dev, merge_lora=merge_lora)
        enc = make_encoder(encoder, net, files, artifacts, max_batch=opts.encoder_batch_size)
        dec = None
        if decoder == "trtllm":
            from engine.backends.decoder_trtllm import TrtllmDecoder

            dec = TrtllmDecoder(decoder_dir, cuda_graphs=opts.cuda_graphs,
                                expected_weights_sha256=file_sha256(files.weights))
        return cls(net, tok, enc, decoder=dec, options=opts)

    def _default_kv_tokens(self) -> int:
        o = self.options
        cap = o.max_batch_size * o.max_seq_len  # more than this can never be in use at once
        if self.model.device.type != "cuda":
            return cap
        from engine.backends.decoder_torch import PagedKV

        free, _ = torch.cuda.mem_get_info(self.model.device)
        return min(cap, int(free * o.kv_memory_fraction) // PagedKV.bytes_per_token(self.model))

    # ---- client side (any thread) ------------------------------------------------------------------

    def _post(self, msg: tuple) -> None:
        with self._cv:
            self._inbox.append(msg)
            self._cv.notify()

    def prompt_tokens(self, num_samples: int, prompt_ids: list[int]) -> int:
        """Prompt length once the audio tag becomes T_enc frames (known before running the encoder)."""
        cfg = self.model.cfg
        n = torch.tensor([num_samples])
        return len(prompt_ids) - 1 + int(subsampled_lengths(cfg.encoder, feature_lengths(cfg.frontend, n))[0])

    def submit(self, audio: AudioInput, sample_rate: int | None = None, max_new_tokens: int | None = None,
               prompt: str | None = None, on_delta: Callable[[str | None], None] | None = None) -> RequestHandle:
        """Queue one utterance; returns at once. ``on_delta`` (called from the engine thread) gets each new
        piece of text, then None when the request ends. Raises AudioError (bad input, named), ValueError
        (too long for max_seq_len / the KV pool), QueueFull or EngineClosed."""
        max_new = self.options.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        # Decoding stops past what max_seq_len could ever hold (12.5 frames per second of audio), so a small
        # compressed upload cannot expand into hours of samples.
        fe, enc = self.model.cfg.frontend, self.model.cfg.encoder
        frames_per_s = fe.sample_rate / (fe.hop_length * enc.subsampling_factor)
        limit = 2 * self.options.max_seq_len / frames_per_s + 1.0  # generous: the exact check follows
        try:
            wave = load_audio(audio, sample_rate, max_seconds=limit)
        except AudioTooLong as e:
            raise AudioTooLong(f"{e}, more than max_seq_len={self.options.max_seq_len} tokens can hold: use "
                               f"long-form transcription (--long-form, runtime.longform)") from None
        duration = len(wave) / TARGET_RATE
        wave = pad_short(wave, self.model.cfg.frontend.hop_length)
        ids = self.tokenizer.prompt_ids(prompt or self.options.prompt)
        prompt_len = self.prompt_tokens(len(wave), ids)
        if prompt_len + max_new > self.options.max_seq_len:
            raise ValueError(f"{duration:.1f} s of audio needs {prompt_len} prompt tokens + "
                             f"{max_new} new tokens > max_seq_len={self.options.max_seq_len}: use long-form "
                             f"transcription (--long-form, runtime.longform) or raise max_seq_len")
        self.scheduler.check_fits(Sequence(-1, prompt_len, max_new))  # reads only constants: thread-safe
        return self._enqueue(duration, on_delta, lambda h: _Request(h, wave, ids, max_new, prompt_len, []))

    def _enqueue(self, duration: float, on_delta, make) -> RequestHandle:
        """Put a checked request into the inbox, within max_queue; ``make(handle)`` builds its engine-thread state."""
        with self._cv:
            if self._closing:
                raise EngineClosed("engine is closing: no new requests")
            if self._queued >= self.options.max_queue:
                raise QueueFull(f"{self._queued} requests already queued (max_queue={self.options.max_queue})")
            handle = RequestHandle(self._next_id, self, duration, on_delta)
            self._next_id += 1
            self._queued += 1
            self._inbox.append(("submit", make(handle)))
            self._cv.notify()
        return handle

    async def stream(self, audio: AudioInput, **kw) -> AsyncIterator[str]:
        """Yield text deltas as they are decoded; cancels the request if the consumer stops early."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = self.submit(audio, on_delta=lambda d: loop.call_soon_threadsafe(queue.put_nowait, d), **kw)
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            handle.result(0)  # raises if the request failed
        finally:
            if not handle.done():
                handle.cancel()

    def map(self, inputs: Iterable[AudioInput], **kw) -> Iterator[tuple[AudioInput, Transcription | Exception]]:
        """Transcribe many inputs, yielding ``(input, result)`` in input order as they complete; a bad input
        yields its exception (AudioError, ValueError, or the request's failure) and the others go on. When
        the queue is full, waits for the oldest request instead of failing."""
        window: deque[tuple[AudioInput, RequestHandle | Exception]] = deque()

        def resolve(item):
            x, h = item
            if isinstance(h, Exception):
                return x, h
            try:
                return x, h.result()
            except Exception as e:
                return x, e

        for x in inputs:
            while True:
                try:
                    window.append((x, self.submit(x, **kw)))
                    break
                except QueueFull:
                    if not window:
                        raise
                    yield resolve(window.popleft())
                except (AudioError, ValueError) as e:
                    window.append((x, e))
                    break
            while window and (isinstance(window[0][1], Exception) or window[0][1].done()):
                yield resolve(window.popleft())
        while window:
            yield resolve(window.popleft())

    def transcribe(self, inputs: Iterable[AudioInput], **kw) -> list[Transcription]:
        """All results in input order; raises the first failure once every input has been processed."""
        results = [r for _, r in self.map(inputs, **kw)]
        error = next((r for r in results if isinstance(r, Exception)), None)
        if error is not None:
            raise error
        return results  # type: ignore[return-value]

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every accepted one, stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self.run_until_idle()
        drained = self._thread is None or not self._thread.is_alive()
        decoder = getattr(self, "decoder", None)  # (ParakeetEngine shares this method)
        if drained and hasattr(decoder, "close") and not getattr(self, "_decoder_closed", False):
            self._decoder_closed = True  # e.g. TensorRT-LLM's executor: its threads and KV memory
            decoder.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_blocks_used": self.allocator.used_blocks, "kv_blocks_free": self.allocator.free_blocks,
                "queued": self._queued, "steps": self.steps, "admit_steps": self.admit_steps,
                "encoded_waiting": sum(r.embedding is not None for r in list(self._requests.values()))}

    # ---- engine thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and self.scheduler.idle and not self._closing:
                    self._cv.wait()
                if self._closing and not self._inbox and self.scheduler.idle:
                    return
            try:
                self.step()
            except Exception as e:  # a bug in the engine itself: fail everything, keep serving
                log.exception("engine step failed")
                for rid in list(self._requests):
                    try:
                        self._finish(self._requests[rid], "error", e)
                    except Exception:
                        log.exception("could not retire request %d", rid)
                        self._requests.pop(rid, None)

    def run_until_idle(self) -> None:
        while self._inbox or not self.scheduler.idle:
            self.step()

    def step(self) -> None:
        """Take new requests and cancellations; encode ahead; admit a chunk (encode the rest, queue their
        prefill); one decoder step; postprocess what it delivered."""
        self.steps += 1  # counted when it begins, so a result never arrives before its step is counted
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "submit":
                self._requests[payload.handle.id] = payload
                try:
                    self.scheduler.add(Sequence(payload.handle.id, payload.prompt_len, payload.max_new_tokens))
                except Exception as e:  # checked in submit already; never lose the rest of the inbox
                    self._requests.pop(payload.handle.id)
                    with self._cv:
                        self._queued -= 1
                    self._resolve_failed(payload, e)
            elif kind == "cancel" and payload in self._requests:
                self._finish(self._requests[payload], "cancelled")  # resolves its handle whatever happens
        self._encode_ahead()
        admitted = self.scheduler.schedule()
        if admitted:
            self.admit_steps += 1
            with self._cv:
                self._queued -= len(admitted)
            self._admit([self._requests[s.id] for s in admitted], admitted)
        if self.scheduler.running:
            try:
                new = self.decoder.step()
            except Exception as e:  # the batch is lost: fail its requests, free their memory, go on
                log.exception("decoder step failed")
                for s in list(self.scheduler.running.values()):
                    self._finish(self._requests[s.id], "error", e)
                new = {}
            verdicts = getattr(self.decoder, "finished", None)
            logprobs = getattr(self.decoder, "logprobs", None) or {}
            for rid, tokens in new.items():
                r = self._requests.get(rid)
                lp = logprobs.pop(rid, None)
                verdict = verdicts.pop(rid, None) if verdicts is not None else None
                if r is None:
                    continue
                try:  # postprocessing (detokenisation, callbacks) of one request must not fail the others
                    self._on_tokens(r, tokens, lp, verdict, verdicts is None)
                except Exception as e:
                    log.exception("postprocessing of request %d failed", rid)
                    self._finish(r, "error", e)
            for rid in list(verdicts or {}):  # a verdict that came without tokens
                verdict = verdicts.pop(rid)
                if rid in self._requests:
                    try:
                        self._on_tokens(self._requests[rid], [], None, verdict, False)
                    except Exception as e:
                        log.exception("request %d", rid)
                        self._finish(self._requests[rid], "error", e)
            failed = getattr(self.decoder, "failed", {})
            for rid in list(failed):
                msg = failed.pop(rid)
                if rid in self._requests:
                    self._finish(self._requests[rid], "error", RuntimeError(f"decoder: {msg}"))

    def _resolve_failed(self, r: _Request, error: BaseException) -> None:
        """A request that never reached the scheduler: resolve its handle with ``error``."""
        r.finished = True
        r.handle._error = error if isinstance(error, Exception) else RuntimeError(str(error))
        r.handle.finished_at = time.perf_counter()
        r.handle._done.set()
        _notify(r.handle, None)

    def _encode(self, reqs: list[_Request]) -> None:
        """Encode the requests' audio as one call (the backend cuts it into length-sorted batches); if that
        fails, one request at a time, so a bad one fails alone. Sets ``embedding`` or fails the request."""
        try:
            embeddings = self.encoder.encode([r.audio for r in reqs])
        except Exception:
            log.exception("encoder batch failed; retrying one by one")
            embeddings = []
            for r in reqs:
                try:
                    embeddings.append(self.encoder.encode([r.audio])[0])
                except Exception as e:
                    embeddings.append(e)
        if len(embeddings) != len(reqs):
            embeddings = list(embeddings)[: len(reqs)]
            embeddings += [RuntimeError(f"the {getattr(self.encoder, 'name', '?')} encoder returned no embedding "
                                        f"for this request")] * (len(reqs) - len(embeddings))
        for r, emb in zip(reqs, embeddings):
            if isinstance(emb, Exception):
                self._finish(r, "error", emb)
                continue
            expected = r.prompt_len - len(r.prompt_ids) + 1
            if emb.shape[0] != expected:
                self._finish(r, "error", RuntimeError(f"encoder returned {emb.shape[0]} frames, expected {expected}"))
                continue
            r.embedding = emb
            r.audio = np.empty(0, np.float32)  # the waveform is no longer needed
            self._encoded_bytes += emb.numel() * emb.element_size()

    def _encode_ahead(self) -> None:
        """Encode waiting requests before they are admitted, in full batches: when fewer of the requests that
        the next admission will take are encoded than it needs, encode the next ``encoder_batch_size`` (or
        what that admission needs, if more) from the front of the queue, within ``encode_ahead_mb``."""
        waiting = self.scheduler.waiting
        if not waiting:
            return
        free = self.scheduler.max_running - len(self.scheduler.running)
        need = min(len(waiting), max(free, self.scheduler.refill_slots))
        missing = sum(self._requests[s.id].embedding is None for s in itertools.islice(waiting, need))
        if not missing:
            return
        budget = self.options.encode_ahead_mb * 2**20 - self._encoded_bytes
        hidden = self.model.cfg.llm.hidden_size * self.model.embed_tokens.weight.element_size()
        batch, want = [], max(self.options.encoder_batch_size, missing)
        for s in waiting:
            r = self._requests[s.id]
            if r.embedding is not None:
                continue
            cost = (r.prompt_len - len(r.prompt_ids) + 1) * hidden
            if batch and cost > budget:
                break
            batch.append(r)
            budget -= cost
            if len(batch) >= want:
                break
        self._encode(batch)

    def _admit(self, reqs: list[_Request], seqs: list[Sequence]) -> None:
        """Encode what was not encoded ahead, then hand each request to the decoder."""
        self._encode([r for r in reqs if r.embedding is None and not r.finished])
        for r, seq in zip(reqs, seqs):
            if r.finished:  # failed in the encoder
                continue
            emb, r.embedding = r.embedding, None
            self._encoded_bytes -= emb.numel() * emb.element_size()
            k = r.prompt_ids.index(self.tokenizer.audio_id)
            try:
                self.decoder.add(DecodeRequest(r.handle.id, r.prompt_ids[:k], emb, r.prompt_ids[k + 1 :],
                                               r.max_new_tokens, seq.blocks))
            except Exception as e:
                self._finish(r, "error", e)

    def _on_tokens(self, r: _Request, tokens: list[int], logprobs: list[float] | None, verdict: str | None,
                   legacy: bool) -> None:
        """Append what the decoder delivered; retire the request on the decoder's verdict ("stop": the last
        token is end of turn, dropped from the ids; "length"). Any disagreement between the decoder and the
        tokenizer about where a request ends fails the request loudly instead of decoding on forever."""
        if r.finished:
            return
        if tokens and r.handle.first_token_at is None:
            r.handle.first_token_at = time.perf_counter()
        eos = self.tokenizer.eos_id
        if legacy:  # a decoder without verdicts: the engine decides on eos and the length limit itself
            if eos in tokens:
                tokens, verdict = tokens[: tokens.index(eos) + 1], "stop"
            elif len(r.token_ids) + len(tokens) >= r.max_new_tokens:
                verdict = "length"
        r.token_ids.extend(tokens)
        if logprobs is not None:
            r.logprobs = (r.logprobs or []) + list(logprobs)
        if verdict == "stop":
            if not r.token_ids or r.token_ids[-1] != eos:
                last = r.token_ids[-1] if r.token_ids else None
                raise RuntimeError(f"request {r.handle.id}: the decoder stopped on token {last}, not on the "
                                   f"tokenizer's end of turn {eos}: decoder and tokenizer disagree on eos")
            r.token_ids.pop()
            if r.logprobs:
                r.logprobs = r.logprobs[: len(r.token_ids)]
            return self._finish(r, "stop")
        if verdict not in (None, "length"):
            raise RuntimeError(f"request {r.handle.id}: unknown finish reason {verdict!r} from the decoder")
        if len(r.token_ids) > r.max_new_tokens or eos in tokens:
            raise RuntimeError(f"request {r.handle.id}: the decoder went past "
                               f"{'end of turn' if eos in tokens else f'max_new_tokens={r.max_new_tokens}'} "
                               f"without finishing the request: decoder and tokenizer disagree on eos or limits")
        if verdict == "length":
            return self._finish(r, "length")
        if len(r.token_ids) == r.max_new_tokens:
            raise RuntimeError(f"request {r.handle.id}: the decoder delivered max_new_tokens={r.max_new_tokens} "
                               f"tokens without finishing the request")
        self._emit(r, final=False)

    def _emit(self, r: _Request, final: bool) -> None:
        """Stream the text that is now stable: not an incomplete UTF-8 character, not trailing spaces
        (the final text is stripped, and the concatenated deltas must equal it)."""
        if r.handle._on_delta is None:
            return
        text = self.tokenizer.decode(r.token_ids).lstrip()
        text = text.rstrip() if final else text.rstrip().rstrip("\ufffd")
        if len(text) > len(r.sent) and text.startswith(r.sent):
            delta, r.sent = text[len(r.sent) :], text
            _notify(r.handle, delta)

    def _finish(self, r: _Request, reason: str, error: BaseException | None = None) -> None:
        """Retire a request exactly once: free its decoder state and KV blocks, resolve its handle. The handle
        is resolved even if freeing fails (the failure becomes its error), so no caller ever waits forever."""
        if r.finished:
            return
        r.finished = True
        h = r.handle
        try:
            if r.embedding is not None:
                self._encoded_bytes -= r.embedding.numel() * r.embedding.element_size()
                r.embedding = None
            if h.id not in self.scheduler.running:  # retired while still waiting for admission
                with self._cv:
                    self._queued -= 1
            self.scheduler.finish(h.id)  # before the decoder: the KV blocks come back whatever it does
            self._requests.pop(h.id, None)
            self.decoder.release(h.id)
            if error is None:
                h._result = Transcription(self.tokenizer.decode(r.token_ids).strip(), list(r.token_ids), h.duration,
                                          reason, logprobs=r.logprobs)
                self._emit(r, final=True)
        except Exception as e:
            log.exception("retiring request %d failed", h.id)
            error = error or e
        finally:
            self._requests.pop(h.id, None)
            h.finished_at = time.perf_counter()
            if error is not None:
                h._result = None
                h._error = error if isinstance(error, Exception) else RuntimeError(str(error))
            h._done.set()
            _notify(h, None)
